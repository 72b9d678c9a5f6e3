"""Causal basis: the residual directions of a layer that matter most to the lens's output."""

import streamlit as st

import app_state as S
from lenskit import plotting
from lenskit.errors import LenskitError

st.title("Causal basis")
st.caption(
    "For a layer, the few orthonormal residual directions whose ablation moves the tuned "
    "lens's output most (mean KL, bits per token), and how much the same ablation moves "
    "the model's own output. Extract a basis with `lenskit causal-basis --model M --lens "
    "tuned --layer L --k 8 --out DIR`; the embedded model ships one for layers 6, 12, 18 "
    "and 24."
)
name, device, dtype = S.model_key()
S.guard(S.load_model, name, device, dtype)
try:
    lens = S.load_lens(S.CAUSAL_KIND, name, device, dtype, S.lens_path(S.CAUSAL_KIND))
except LenskitError as err:  # no basis for this model yet: say how to make one
    st.info(str(err))
    st.stop()

c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", lens.layers, index=len(lens.layers) // 2)
top = c2.slider("Tokens per side", 3, 15, 8)
basis = S.guard(S.causal_basis, lens.source, layer)
st.plotly_chart(plotting.influence_plot(basis), use_container_width=True)
tokens = S.guard(S.direction_tokens, name, device, dtype, S.lens_path(S.CAUSAL_KIND), layer, top)
st.plotly_chart(plotting.direction_tokens_plot(tokens), use_container_width=True)
st.dataframe(basis.to_frame(), hide_index=True)
