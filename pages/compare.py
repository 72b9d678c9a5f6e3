"""Compare: two to four lenses on one prompt, one position in depth, where two differ."""

import pandas as pd
import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.comparison import MEASURES
from lenskit.plotting.heatmaps import MAX_PANELS
from lenskit.plotting.style import display_token, select_rows
from lenskit_app import loaders, widgets
from lenskit_app.downloads import export_buttons
from lenskit_app.paths import folder_name

# What a layer decodes to (logit, tuned), within its causal directions, and what it causes.
DEFAULT_KINDS = ("logit", "tuned", S.CAUSAL_KIND, "jacobian")
CELLS, POS, CLICK = "compare_cells", "compare_pos", "compare_click"  # widget / state keys

st.title("Compare lenses")

(name, device, dtype), model, prompt, n_tokens = widgets.prompt_section()
ready = loaders.ready_lenses(name, device, dtype)
default = [k for k in DEFAULT_KINDS if k in ready]
if len(default) < 2:
    default = (default + [k for k in ready if k not in default])[:3]
kinds = st.multiselect(
    f"Lenses (two to {MAX_PANELS})",
    ready,
    default=default,
    max_selections=MAX_PANELS,
    help="Lenses not ready for this model are listed on the Home page with the reason.",
)
if len(kinds) < 2:
    st.warning("Choose at least two lenses to compare.")
    st.stop()

adapter = loaders.adapter(model)
c1, c2, c3 = st.columns(3)
statistic = c1.selectbox(
    "Colour",
    [s for s in plotting.STATISTICS if not s.startswith("target")],
    format_func=plotting.metric_name,
)
stride = c2.slider("Layer stride", 1, max(1, adapter.n_layers // 2), 2)
first, last = c3.slider("Token range", 0, n_tokens, (max(0, n_tokens - 32), n_tokens))
sublayer = widgets.sublayer_points(adapter)
paths = tuple(S.lens_path(k) for k in kinds)
meta = {"model": name, "lens": ", ".join(kinds), "prompt": prompt}
stem = f"lenskit-compare-{folder_name(name)}"

top, depth = st.container(), st.container()  # filled once the pair below is chosen

st.subheader("Where two lenses differ")
d1, d2, d3 = st.columns(3)
kind_a = d1.selectbox("Lens A", kinds, index=0)
kind_b = d2.selectbox("Lens B", [k for k in kinds if k != kind_a], index=0)
measure = d3.selectbox("Measure", list(MEASURES), format_func=MEASURES.get, index=1)

# One pass over the shown cells only: each lens reads each shown row once, shared by the
# stacked heatmaps and the divergence map.
labels = [r.label for r in S.guard(adapter.rows, sublayer)]
rows = tuple(S.guard(select_rows, labels, stride))
result = S.guard(
    loaders.comparison,
    tuple(kinds),
    paths,
    (kind_a, kind_b),
    name,
    device,
    dtype,
    prompt,
    rows,
    (first, last),
    None,
    sublayer,
)

# A click on a cell picks its position (and outlines the cell in every lens).
points = (st.session_state.get(CELLS) or {}).get("selection", {}).get("points", [])
click = (int(points[0]["x"]), int(points[0]["y"])) if points else None
if click is not None and click != st.session_state.get(CLICK):
    st.session_state[CLICK] = click
    st.session_state[POS] = click[0]
if st.session_state.get(POS) not in range(first, last):
    st.session_state[POS] = last - 1
pos = st.session_state[POS]
row = (st.session_state.get(CLICK) or (pos, len(rows) - 1))[1]

with top:
    st.caption(
        "Hover a cell to see it in every lens; click one to read its position in depth below. "
        "In token labels · is a space and ↵ a newline."
    )
    fig = S.guard(
        plotting.compare_heatmaps,
        list(result.trajectories),
        statistic=statistic,
        layer_stride=stride,
        token_range=(first, last),
        selected=(pos, min(row, len(rows) - 1)),
        clickable=True,
    )
    st.plotly_chart(
        fig, width="content", theme=None, key=CELLS, on_select="rerun", selection_mode="points"
    )
    export_buttons(
        "compare",
        stem,
        fig,
        pd.concat([t.to_frame().assign(lens=t.lens_kind) for t in result.trajectories]),
        meta,
    )


# --- one position in depth --------------------------------------------------------------
# Every panel reads the same per-position comparison (all rows, this position only).

with depth:
    st.subheader("One position in depth")
    tokens = result.trajectories[0].tokens
    p1, p2, p3 = st.columns([2, 2, 1])
    p1.selectbox(
        "Position",
        list(range(first, last)),
        key=POS,
        format_func=lambda p: f"{p}: {display_token(tokens[p], 24, escape=False)}",
        help="Or click a cell above.",
    )
    typed = p2.text_input(
        "Target token",
        value="",
        help="Followed in every lens below; empty: the model's prediction.",
    )
    k = p3.slider("Top-k", 1, 10, 5)
    # By default the model's own top-1 at this position (by id: it always is one token).
    target = typed or int(result.trajectories[0].top_ids[-1, pos, 0])
    at_pos = S.report(  # a bad target: its error here, the rest of the page stays
        loaders.comparison,
        tuple(kinds),
        paths,
        (),
        name,
        device,
        dtype,
        prompt,
        None,
        (pos, pos + 1),
        target,
        sublayer,
    )
    if at_pos is not None:
        trajs = list(at_pos.trajectories)
        position_fig = S.guard(plotting.position_topk, trajs, pos, k=k)
        st.plotly_chart(position_fig, width="content", theme=None)
        t1, t2 = st.columns(2)
        for column, value in zip((t1, t2), ("prob", "rank"), strict=True):
            column.plotly_chart(
                S.guard(plotting.target_plot, trajs, positions=[pos], value=value),
                width="stretch",
                theme=None,
            )
        if not typed:
            shown = display_token(trajs[0].target, escape=False)
            st.caption(f"Target: {shown!r}, the model's top-1 here.")
        if st.toggle("Which block moved it: attention or MLP?", key="compare_attribution"):
            parts = S.report(
                loaders.attribution,
                tuple(kinds),
                paths,
                name,
                device,
                dtype,
                prompt,
                pos,
                int(trajs[0].target_id),
            )
            if parts:
                st.plotly_chart(
                    S.guard(plotting.attribution_plot, parts), width="stretch", theme=None
                )
        export_buttons(
            "position",
            f"{stem}-pos{pos}",
            position_fig,
            pd.concat([t.to_frame().assign(lens=t.lens_kind) for t in trajs]),
            {**meta, "position": pos, "target": trajs[0].target},
        )

div_fig = S.guard(
    plotting.divergence_heatmap,
    result.divergence,
    measure=measure,
    layer_stride=stride,
    token_range=(first, last),
)
st.plotly_chart(div_fig, width="content", theme=None)
export_buttons(
    "divergence",
    f"{stem}-{kind_a}-vs-{kind_b}",
    div_fig,
    result.divergence,
    {**meta, "lens": f"{kind_a} vs {kind_b}"},
)
