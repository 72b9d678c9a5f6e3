"""Figures from lenskit results: every function takes results and returns a ``go.Figure``.

Nothing here calls a model. Heatmaps put the first block input (``L0``) at the
bottom and the model's ``output`` row at the top; colours run light (poor) to
dark (good). Tokens are shown with visible whitespace (``·``, ``↵``, ``→``) and
shortened with ``…``. Save figures with :func:`lenskit.export.save_figure`.
"""

from lenskit.plotting.causal import direction_tokens_plot, influence_plot
from lenskit.plotting.divergence import divergence_heatmap
from lenskit.plotting.heatmaps import STATISTICS, compare_heatmaps, trajectory_heatmap
from lenskit.plotting.lines import metric_lines, target_plot
from lenskit.plotting.style import PALETTE, TEMPLATE, display_token

__all__ = [
    "PALETTE",
    "STATISTICS",
    "TEMPLATE",
    "compare_heatmaps",
    "direction_tokens_plot",
    "display_token",
    "divergence_heatmap",
    "influence_plot",
    "metric_lines",
    "target_plot",
    "trajectory_heatmap",
]
