"""The one exception type lenskit raises for bad input.

Every message is a single line that names the problem and the fix, so the CLI
and the app can show it as it is, without a traceback.
"""

from __future__ import annotations


class LenskitError(ValueError):
    """Bad input from a user: a one-line message naming the problem and the fix."""
