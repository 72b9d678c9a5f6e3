"""Compare: two or three lenses side by side on one prompt, and where two of them differ."""

import streamlit as st

import app_state as S
from lenskit import plotting
from lenskit.comparison import MEASURES

st.title("Compare lenses")

(name, device, dtype), model, prompt, n_tokens = S.prompt_section()
ready = S.ready_lenses(name, device, dtype)
kinds = st.multiselect(
    "Lenses (two or three)", ready, default=ready[:3], max_selections=3,
    help="Lenses not ready for this model are listed on the Home page with the reason.",
)
if len(kinds) < 2:
    st.warning("Choose at least two lenses to compare.")
    st.stop()

adapter = S.adapter(model)
c1, c2, c3 = st.columns(3)
statistic = c1.selectbox("Colour", [s for s in plotting.STATISTICS if not s.startswith("target")])
stride = c2.slider("Layer stride", 1, max(1, adapter.n_layers // 2), 2)
first, last = c3.slider("Token range", 0, n_tokens, (max(0, n_tokens - 24), n_tokens))

trajs = [
    S.guard(S.trajectory, k, name, device, dtype, S.lens_path(k), prompt, None, 10) for k in kinds
]
fig = S.guard(
    plotting.compare_heatmaps, trajs, statistic=statistic, layer_stride=stride,
    token_range=(first, last),
)
st.plotly_chart(fig, use_container_width=True)

st.subheader("Where two lenses differ")
d1, d2, d3 = st.columns(3)
kind_a = d1.selectbox("Lens A", kinds, index=0)
kind_b = d2.selectbox("Lens B", [k for k in kinds if k != kind_a], index=0)
measure = d3.selectbox("Measure", list(MEASURES), format_func=MEASURES.get, index=1)
div = S.guard(
    S.divergence, kind_a, S.lens_path(kind_a), kind_b, S.lens_path(kind_b), name, device, dtype,
    prompt,
)
st.plotly_chart(
    S.guard(
        plotting.divergence_heatmap, div, measure=measure, layer_stride=stride,
        token_range=(first, last),
    ),
    use_container_width=True,
)
