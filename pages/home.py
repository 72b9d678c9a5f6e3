"""Home: choose the model and the prompt, see which lenses are ready."""

import streamlit as st

import lenskit_app.state as S
from lenskit_app import loaders, widgets

S.init_state()

st.title("lenskit")
st.caption(
    "How a transformer builds its next-token prediction, layer by layer: logit, tuned and "
    "other lenses read every layer's residual stream through the model's own unembedding."
)

models = widgets.known_models()
current = st.session_state[S.MODEL]
choice = st.selectbox(
    "Model",
    [*models, "Other (local folder or Hugging Face id)…"],
    index=models.index(current) if current in models else len(models),
    help="smollm2-135m is embedded and works offline; tiny-* are small random models.",
)
if choice in models:
    st.session_state[S.MODEL] = choice
else:
    widgets.model_box(models)  # every edit is kept (the box is bound to a session key)

widgets.prompt_box(height=100)

name, device, dtype = S.model_key()
model = S.guard(loaders.load_model, name, device, dtype)
n_tokens = S.report(widgets.count_tokens, model, st.session_state[S.PROMPT])
adapter = loaders.adapter(model)
st.markdown(
    f"**{name}** · {adapter.architecture} · {adapter.n_layers} layers · d_model "
    f"{adapter.d_model} · vocabulary {adapter.d_vocab:,}"
    + (f" · prompt: {n_tokens} tokens" if n_tokens else "")
)

st.subheader("Lenses")
with st.expander("Lens files", expanded=any(st.session_state[S.LENS_PATHS].values())):
    widgets.lens_files_section(name)
status = loaders.lens_status(name, device, dtype)
for kind, state in status.items():
    if state == "ready":
        st.markdown(f"✅ **{kind}** — ready")
    else:
        st.markdown(f"⚪ **{kind}** — {state}")
        if S.lens_path(kind):  # a file the user chose does not load: say why, with the fix
            st.error(f"The {kind} lens file does not load: {state}")

st.page_link("pages/trajectory.py", label="See the prediction form layer by layer", icon="➡️")
