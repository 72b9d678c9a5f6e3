"""Figures from lenskit results: every function takes results and returns a ``go.Figure``.

Nothing here calls a model. Heatmaps put the first block input (``L0``) at the
bottom and the model's ``output`` row at the top; colours run light (poor) to
dark (good). Tokens are shown with visible whitespace (``·``, ``↵``, ``→``) and
shortened with ``…``. Save figures with :func:`lenskit.export.save_figure`.

Example:
    >>> import lenskit
    >>> from lenskit.plotting import trajectory_heatmap
    >>> model = lenskit.load_model("tiny-llama")
    >>> traj = lenskit.trajectory(model, lenskit.get_lens("logit", model), "a b c d")
    >>> type(trajectory_heatmap(traj)).__name__
    'Figure'
"""

from lenskit.plotting.attribution import attribution_plot
from lenskit.plotting.causal import direction_tokens_plot, influence_plot
from lenskit.plotting.divergence import divergence_heatmap
from lenskit.plotting.heatmaps import STATISTICS, compare_heatmaps, trajectory_heatmap
from lenskit.plotting.lines import metric_lines, training_lines
from lenskit.plotting.names import METRIC_NAMES, metric_name
from lenskit.plotting.position import position_topk
from lenskit.plotting.style import PALETTE, TEMPLATE, display_token
from lenskit.plotting.target import target_plot

__all__ = [
    "METRIC_NAMES",
    "PALETTE",
    "STATISTICS",
    "TEMPLATE",
    "attribution_plot",
    "compare_heatmaps",
    "direction_tokens_plot",
    "display_token",
    "divergence_heatmap",
    "influence_plot",
    "metric_lines",
    "metric_name",
    "position_topk",
    "target_plot",
    "training_lines",
    "trajectory_heatmap",
]
