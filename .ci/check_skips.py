"""Fail CI when a test was skipped (or xfailed) without an allowed reason.

Reads the JUnit XML report pytest wrote (``--junitxml``) and lists every test that did
not run. A skip is allowed only where ``ALLOWED`` names a pattern of its reason, with why
it may be skipped on a CI machine; every other skip is an error, so a test whose
dependency is missing from the test extras fails CI instead of passing unseen.

Usage: ``python .ci/check_skips.py REPORT.xml``
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

# reason pattern -> why a CI machine may skip it
ALLOWED: dict[str, str] = {
    r"needs CUDA": "GPU-only tests; CI machines are CPU-only",
}


def not_run(report: str) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped or xfailed test in a JUnit XML report."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for node in case.findall("skipped"):  # pytest reports xfails as skipped too
            test = f"{case.get('classname')}::{case.get('name')}"
            reason = (node.get("message") or node.text or "").strip()
            out.append((test, f"{node.get('type', 'skipped')}: {reason}"))
    return out


def main(argv: list[str]) -> int:
    """Print the unexpected skips; exit 1 if there are any."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    skipped = not_run(argv[1])
    unexpected = [
        (test, reason)
        for test, reason in skipped
        if not any(re.search(pattern, reason) for pattern in ALLOWED)
    ]
    for test, reason in unexpected:
        print(f"unexpected skip: {test} ({reason})", file=sys.stderr)
    allowed = len(skipped) - len(unexpected)
    print(f"check_skips: {len(skipped)} not run, {allowed} allowed, {len(unexpected)} unexpected")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
