"""Trajectory: one lens, every layer, every position of the prompt."""

import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.plotting.style import select_rows
from lenskit_app import loaders, widgets
from lenskit_app.downloads import export_buttons
from lenskit_app.paths import folder_name

st.title("Trajectory")

(name, device, dtype), model, prompt, n_tokens = widgets.prompt_section()
ready = loaders.ready_lenses(name, device, dtype)
left, mid, right = st.columns(3)
kind = left.selectbox("Lens", ready, index=0)
statistic = mid.selectbox(
    "Colour", list(plotting.STATISTICS), index=0, format_func=plotting.metric_name
)
target = right.text_input("Target token (optional)", value="", help="e.g. ' Paris'")

adapter = loaders.adapter(model)
c1, c2 = st.columns(2)
stride = c1.slider("Layer stride", 1, max(1, adapter.n_layers // 2), 1)
first, last = c2.slider("Token range", 0, n_tokens, (max(0, n_tokens - 32), n_tokens))
points = widgets.sublayer_points(adapter)

if statistic.startswith("target") and not target:
    st.error("The target statistics need a target token: type one above, e.g. ' Paris'.")
    st.stop()

# Only the shown cells are read: each costs one unembedding matmul.
labels = [r.label for r in S.guard(adapter.rows, points)]
rows = tuple(S.guard(select_rows, labels, stride))
traj = S.guard(
    loaders.trajectory,
    kind,
    name,
    device,
    dtype,
    S.lens_path(kind),
    prompt,
    target,
    10,
    rows,
    (first, last),
    points,
)
fig = S.guard(
    plotting.trajectory_heatmap,
    traj,
    statistic=statistic,
    layer_stride=stride,
    token_range=(first, last),
)
st.plotly_chart(fig, width="content", theme=None)
export_buttons(
    "trajectory",
    f"lenskit-trajectory-{folder_name(name)}-{kind}",
    fig,
    traj,
    {"model": name, "lens": kind, "prompt": prompt},
)
# Built only when asked for: the table of every shown cell costs the browser more than
# the heatmap does.
if st.toggle(
    "Show the numbers",
    help="Every shown cell: top-1 token and probability, "
    "entropy, KL to the output and next-token cross-entropy, in bits.",
):
    st.dataframe(traj.to_frame().drop(columns=["topk_tokens", "topk_probs"]))
