"""Evaluate: per-layer metrics of the chosen lenses over a corpus, as a table and a plot."""

import json

import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.evaluation.results import METRICS, PER_BYTE
from lenskit.export import figure_bytes, find_browser
from lenskit_app.paths import corpus_stamp, folder_name

st.title("Evaluate lenses over a corpus")
name, device, dtype = S.model_key()
model = S.guard(S.load_model, name, device, dtype)
adapter = S.adapter(model)
ready = S.ready_lenses(name, device, dtype)
kinds = st.multiselect(
    "Lenses",
    ready,
    default=ready,
    help="Lenses not ready for this model are listed on the Home page with the reason; "
    "choose lens files there.",
)
corpus = S.corpus_section("eval")
c1, c2, c3 = st.columns(3)
tokens = c1.number_input(
    "Tokens",
    2,
    1 << 30,
    2048,
    step=512,
    help="Read in whole sequences; more tokens give narrower error bands.",
)
seq_len = c2.number_input("Tokens per sequence", 2, adapter.n_ctx, min(128, adapter.n_ctx))
held_out = c3.checkbox(
    "Held-out documents only",
    value=True,
    help="Score only the 10% of documents that training holds out (seed 0), so a lens "
    "trained on this corpus is scored on text it never saw.",
)
inputs = {
    "name": name,
    "device": device,
    "dtype": dtype,
    "lenses": tuple((kind, S.lens_path(kind)) for kind in kinds),
    "corpus": corpus,
    "stamp": corpus_stamp(corpus),
    "tokens": int(tokens),
    "seq_len": int(seq_len),
    "held_out": 0.1 if held_out else None,
    "seed": 0,
}
if st.button("Run", type="primary"):
    if not kinds:
        st.error("No lens is chosen: pick at least one above (the logit lens is always ready).")
        st.stop()
    st.session_state[S.EVAL] = inputs
last = st.session_state.get(S.EVAL)
if last is None:
    st.info("Choose lenses, a corpus and a token count, then press Run.")
    st.stop()
if last != inputs:
    st.caption("The settings changed since this run: press Run to evaluate them.")
result = S.report(S.evaluation, **last)
if result is None:  # the error is shown; forget the run so the next click starts clean
    del st.session_state[S.EVAL]
    st.stop()

st.markdown(
    f"**{result.model}** · {result.tokens:,} tokens ({result.chunks} sequences of "
    f"{result.seq_len}) from {result.source} · {result.seconds:.1f} s "
    f"({result.tokens_per_s:,.0f} tokens/s) · bands: ±1.96 standard errors over sequences"
)
for lens, note in result.notes.items():
    st.caption(f"{lens}: {note}")
frame = result.to_frame()
m1, m2 = st.columns([3, 1])
metric = m1.selectbox("Metric", [*METRICS, *(f"{m}_per_byte" for m in PER_BYTE)])
log_y = m2.checkbox("Log scale")
fig = S.guard(
    plotting.metric_lines,
    frame,
    metric=metric,
    log_y=log_y,
    title=f"{metric} · {result.model} · {result.source}",
)
st.plotly_chart(fig, width="stretch")
st.dataframe(frame, hide_index=True)

stem = f"lenskit-eval-{folder_name(result.model)}"
d1, d2, d3, d4 = st.columns(4)
d1.download_button("CSV", frame.to_csv(index=False), f"{stem}.csv", "text/csv")
d2.download_button(
    "JSON (with provenance)",
    json.dumps({"produced_by": "lenskit app", **result.to_dict()}, indent=2),
    f"{stem}.json",
    "application/json",
)
d3.download_button(
    "Plot (HTML)", lambda: figure_bytes(fig, "html"), f"{stem}-{metric}.html", "text/html"
)
if find_browser():
    d4.download_button(
        "Plot (PNG)", lambda: figure_bytes(fig, "png"), f"{stem}-{metric}.png", "image/png"
    )
else:
    d4.caption(
        "PNG needs Chrome or Chromium on the server (or BROWSER_PATH set to one); the "
        "HTML plot has its own PNG button."
    )
