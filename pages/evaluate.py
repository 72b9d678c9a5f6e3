"""Evaluate: per-layer metrics of the chosen lenses over a corpus, as a table and a plot."""

import json

import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.evaluation import expected_seconds
from lenskit.evaluation.config import QUICK
from lenskit.evaluation.results import METRICS, PER_BYTE
from lenskit.export import figure_bytes, find_browser
from lenskit_app import jobs, loaders, widgets
from lenskit_app.paths import corpus_stamp, folder_name

st.title("Evaluate lenses over a corpus")
name, device, dtype = S.model_key()
model = S.guard(loaders.load_model, name, device, dtype)
adapter = loaders.adapter(model)
ready = loaders.ready_lenses(name, device, dtype)
kinds = st.multiselect(
    "Lenses",
    ready,
    default=ready,
    help="Lenses not ready for this model are listed on the Home page with the reason; "
    "choose lens files there.",
)
corpus = widgets.corpus_section("eval")
c1, c2, c3 = st.columns(3)
tokens = c1.number_input(
    "Tokens",
    2,
    1 << 30,
    QUICK.tokens,
    step=512,
    help="Read in whole sequences; more tokens give narrower error bands.",
)
seq_len = c2.number_input(
    "Tokens per sequence", 2, adapter.n_ctx, min(QUICK.seq_len, adapter.n_ctx)
)
held_out = c3.checkbox(
    "Held-out documents only",
    value=QUICK.held_out is not None,
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
    "held_out": (QUICK.held_out or 0.1) if held_out else None,
    "seed": QUICK.seed,
}
RUNNING, STOPPED = S.EVAL + "_running", S.EVAL + "_stopped"
run_col, stop_col, eta_col = st.columns([1, 1, 4])
if kinds:
    chosen = [loaders.load_lens(kind, name, device, dtype, path) for kind, path in inputs["lenses"]]
    eta_col.caption(
        f"Expected: about {jobs.eta_text(expected_seconds(model, chosen, int(tokens)))} here "
        "(from this machine's measured matmul rate; the bar shows the true rate as it runs)."
    )
clicked = run_col.button("Run", type="primary", disabled=widgets.form_blocked("eval"))
stop_col.button("Stop", help="Stops a running evaluation and keeps the sequences finished so far.")
if clicked:
    if not kinds:
        st.error("No lens is chosen: pick at least one above (the logit lens is always ready).")
        st.stop()
    st.session_state[S.EVAL] = inputs
    st.session_state[RUNNING] = True
    st.session_state.pop(STOPPED, None)
elif st.session_state.get(RUNNING):
    # A run still marked running was cut short by Stop (or another click): a click reruns
    # the page, which interrupts the run at its next progress update. Keep what it finished.
    st.session_state[RUNNING] = False
    st.session_state[STOPPED] = {"result": st.session_state.get(jobs.EVAL_PARTIAL)}
last = st.session_state.get(S.EVAL)
if last is None:
    st.info("Choose lenses, a corpus and a token count, then press Run.")
    st.stop()
if last != inputs:
    st.caption("The settings changed since this run: press Run to evaluate them.")
stopped = st.session_state.get(STOPPED)
if stopped is not None:
    result = stopped["result"]
    if result is None:
        st.info("Stopped before the first sequences finished: press Run to start again.")
        st.stop()
    st.warning(
        f"Stopped: the results of the first {result.tokens:,} of {last['tokens']:,} tokens "
        "(whole sequences). Press Run to evaluate all of them."
    )
else:
    result = S.report(jobs.evaluation, **last)
    st.session_state[RUNNING] = False
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
metric = m1.selectbox(
    "Metric",
    [*METRICS, *(f"{m}_per_byte" for m in PER_BYTE)],
    format_func=plotting.metric_name,
)
log_y = m2.checkbox("Log scale")
fig = S.guard(
    plotting.metric_lines,
    frame,
    metric=metric,
    log_y=log_y,
    title=f"{plotting.metric_name(metric)} · {result.model} · {result.source}",
)
st.plotly_chart(fig, width="stretch", theme=None)  # lenskit's own fonts and colours
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
