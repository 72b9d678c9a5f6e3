"""Compare: two to four lenses side by side on one prompt, and where two of them differ."""

import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.comparison import MEASURES
from lenskit.plotting.heatmaps import MAX_PANELS
from lenskit.plotting.style import select_rows

# What a layer decodes to (logit, tuned), within its causal directions, and what it causes.
DEFAULT_KINDS = ("logit", "tuned", S.CAUSAL_KIND, "jacobian")

st.title("Compare lenses")

(name, device, dtype), model, prompt, n_tokens = S.prompt_section()
ready = S.ready_lenses(name, device, dtype)
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

adapter = S.adapter(model)
c1, c2, c3 = st.columns(3)
statistic = c1.selectbox("Colour", [s for s in plotting.STATISTICS if not s.startswith("target")])
stride = c2.slider("Layer stride", 1, max(1, adapter.n_layers // 2), 2)
# The panels share the page's width: by default about 64 columns in all, split between them.
width = max(8, 64 // len(kinds))
first, last = c3.slider("Token range", 0, n_tokens, (max(0, n_tokens - width), n_tokens))

heatmaps = st.container()  # filled below, once the pair for the divergence map is chosen

st.subheader("Where two lenses differ")
d1, d2, d3 = st.columns(3)
kind_a = d1.selectbox("Lens A", kinds, index=0)
kind_b = d2.selectbox("Lens B", [k for k in kinds if k != kind_a], index=0)
measure = d3.selectbox("Measure", list(MEASURES), format_func=MEASURES.get, index=1)

# One pass over the shown cells only: each lens reads each shown row once, shared by its
# heatmap and the divergence map.
rows = tuple(S.guard(select_rows, adapter.n_rows, stride))
result = S.guard(
    S.comparison,
    tuple(kinds),
    tuple(S.lens_path(k) for k in kinds),
    (kind_a, kind_b),
    name,
    device,
    dtype,
    prompt,
    rows,
    (first, last),
)
heatmaps.plotly_chart(
    S.guard(
        plotting.compare_heatmaps,
        list(result.trajectories),
        statistic=statistic,
        layer_stride=stride,
        token_range=(first, last),
    ),
    width="stretch",
)
st.plotly_chart(
    S.guard(
        plotting.divergence_heatmap,
        result.divergence,
        measure=measure,
        layer_stride=stride,
        token_range=(first, last),
    ),
    width="stretch",
)
