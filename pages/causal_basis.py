"""Causal basis: extract and inspect the residual directions of a layer that matter most."""

import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.causal.config import QUICK, CausalBasisConfig
from lenskit.causal.influence import ABLATIONS
from lenskit.errors import LenskitError
from lenskit.lenses.basis import INDEX_FILE, read_index
from lenskit_app import jobs, loaders, widgets
from lenskit_app.downloads import export_buttons
from lenskit_app.paths import describe_roots, folder_name, next_lens_dir, out_path

# Defaults sized for smollm2-135m on two CPU cores (see the caption of the Extract section).

st.title("Causal basis")
st.caption(
    "For a layer, the few orthonormal residual directions whose ablation moves the tuned "
    "lens's output most (mean KL, bits per token), and how much the same ablation moves "
    "the model's own output. The embedded model ships a basis for layers 6, 12, 18 and 24; "
    "extract one for any layer below (or with `lenskit causal-basis`)."
)
name, device, dtype = S.model_key()
model = S.guard(loaders.load_model, name, device, dtype)
adapter = loaders.adapter(model)
chosen = S.lens_path(S.CAUSAL_KIND)

# A run still marked running was cut short: Stop (or any other click) reruns the page,
# which interrupts the script at its next progress update; finished layers are saved.
record = st.session_state.get(S.CAUSAL_RUN)
if record and record["status"] == "running":
    record["status"] = "stopped"
if record and record["model"] == name and record["status"] == "done":
    st.success(
        f"Extracted layer {record['layer']} into {record['out']} in "
        f"{record['seconds']:.0f} s. The folder is now the causal-basis lens on every "
        "page."
    )
elif record and record["model"] == name and record["status"] == "stopped":
    st.warning(
        f"Extraction of layer {record['layer']} stopped before it finished; layers "
        f"finished before are kept in {record['out']}."
    )

# --- inspect ------------------------------------------------------------------------------

try:
    lens = loaders.load_lens(S.CAUSAL_KIND, name, device, dtype, chosen)
except LenskitError as err:  # no basis for this model yet, or a chosen folder that fails
    lens = None
    (st.error if chosen else st.info)(str(err))

if lens is not None:
    c1, c2 = st.columns(2)
    fresh = record and record["status"] == "done" and record["out"] == lens.source
    latest = record["layer"] if fresh and record["layer"] in lens.layers else None
    layer = c1.selectbox(
        "Layer",
        lens.layers,
        index=lens.layers.index(latest) if latest is not None else len(lens.layers) // 2,
    )
    top = c2.slider("Tokens per side", 3, 15, 8)
    basis = S.guard(loaders.causal_basis, lens.source, layer)
    influence = plotting.influence_plot(basis)
    st.plotly_chart(influence, width="stretch", theme=None)
    stem = f"lenskit-causal-basis-{folder_name(name)}-layer{layer}"
    meta = {"model": name, "lens": f"{S.CAUSAL_KIND} ({lens.source})", "prompt": "(none)"}
    export_buttons("influence", stem, influence, basis.to_frame(), {**meta, "layer": layer})
    tokens = S.guard(loaders.direction_tokens, name, device, dtype, chosen, layer, top)
    token_fig = plotting.direction_tokens_plot(tokens)
    st.plotly_chart(token_fig, width="content", theme=None)
    export_buttons("tokens", f"{stem}-tokens", token_fig, tokens, {**meta, "layer": layer})
    st.dataframe(basis.to_frame(), hide_index=True)

# --- extract ------------------------------------------------------------------------------

with st.expander("Extract a basis", expanded=lens is None or bool(record)):
    st.caption(
        "Finds k directions one after another (L-BFGS, each orthogonal to the ones before), "
        "then measures each on held-out text, on the tuned lens and on the model. With the "
        "defaults, one layer of smollm2-135m takes about a minute on two idle CPU cores "
        "(50 s measured for layer 15; longer on a busy machine); the time grows with k and "
        "the training tokens. A layer is saved when it is finished."
    )
    tuned_path = S.lens_path("tuned")
    try:
        tuned = loaders.load_lens("tuned", name, device, dtype, tuned_path)
    except LenskitError as err:
        (st.error if tuned_path else st.info)(
            f"A causal basis is extracted for the tuned lens, and none loads: {err}. Train one "
            "on the Train page (it then becomes the tuned lens), or choose one on Home."
        )
        st.stop()

    c1, c2, c3 = st.columns(3)
    layer = c1.number_input(
        "Layer to extract",
        0,
        adapter.n_layers - 1,
        adapter.n_layers // 2,
        help=f"A block input, 0..{adapter.n_layers - 1}.",
    )
    k = c2.number_input("Directions (k)", 1, adapter.d_model, min(QUICK.k, adapter.d_model))
    ablation = c3.selectbox(
        "Ablation",
        ABLATIONS,
        index=ABLATIONS.index(QUICK.ablation),
        help="What an ablated direction is set "
        "to: the mean residual, zero, or another token's residual.",
    )
    d1, d2, d3, d4 = st.columns(4)
    seq_len = d1.number_input(
        "Tokens per sequence", 2, adapter.n_ctx, min(QUICK.seq_len, adapter.n_ctx)
    )
    tokens = d2.number_input(
        "Training tokens",
        2,
        1 << 24,
        QUICK.tokens,
        step=256,
        help="Whole sequences; the directions are optimised on these.",
    )
    eval_tokens = d3.number_input(
        "Held-out tokens",
        2,
        1 << 24,
        QUICK.eval_tokens,
        step=256,
        help="Whole sequences; the influences are reported on these.",
    )
    seed = d4.number_input("Seed", 0, 1 << 31, QUICK.seed)
    e1, e2 = st.columns(2)
    max_iter = e1.number_input("Most iterations per direction", 1, 1000, QUICK.max_iter)
    measure_model = e2.checkbox(
        "Measure the influence on the model",
        value=QUICK.model_influence,
        help="k forward passes of the model over the held-out tokens.",
    )
    corpus = widgets.corpus_section("causal")

    out_key = f"causal_out_{folder_name(name)}"
    if out_key not in st.session_state:  # the chosen basis folder grows; else a fresh one
        st.session_state[out_key] = chosen or str(next_lens_dir(name, "causal-basis"))
    out_text = st.text_input(
        "Output folder",
        key=out_key,
        help=f"A basis folder under {describe_roots()}: a new one, or one of this model and "
        f"tuned lens, which gets the layer added (or replaced). Folders under "
        f"lenses/{folder_name(name)}/ there are listed in the Home page's lens picker.",
    )
    out = widgets.checked_path(out_path, out_text, "causal_out")
    if out is not None and (out / INDEX_FILE).is_file():
        index = S.report(read_index, out)
        if index is not None:
            have = sorted(index.layers)
            again = " (it is there already and will be replaced)" if layer in have else ""
            st.caption(
                f"{out} holds layers {', '.join(map(str, have))} of "
                f"{index.model}; layer {layer} is added{again}."
            )

    blocked = out is None or widgets.form_blocked("causal")
    if not st.button("Extract", type="primary", disabled=blocked):
        st.stop()
    config = S.guard(
        CausalBasisConfig,
        k=int(k),
        ablation=ablation,
        tokens=int(tokens),
        eval_tokens=int(eval_tokens),
        seq_len=int(seq_len),
        seed=int(seed),
        max_iter=int(max_iter),
        model_influence=measure_model,
    )
    record = {"out": str(out), "model": name, "layer": int(layer), "status": "running"}
    st.session_state[S.CAUSAL_RUN] = record
    st.button(
        "Stop",
        help="Stops the run; this layer is lost (a layer is saved when "
        "finished), the layers in the folder are kept.",
    )
    bar = st.progress(0.0, text="Reading and tokenizing the corpus…")
    cells = [column.empty() for column in st.columns(4)]
    last = {}

    def show(p):
        """Draw a progress report (each draw is where a Stop click interrupts the run)."""
        if p.phase == "capture":
            text = "Capturing the residual stream…"
        elif p.phase == "search":
            text = (
                f"Layer {p.layer}: direction {p.direction + 1} of {p.k}, iteration "
                f"{p.iteration} (at most {p.max_iter})"
            )
        elif p.phase == "measure":
            text = f"Layer {p.layer}: measuring the {p.k} directions on held-out text…"
        else:
            text = f"Layer {p.layer}: saved"
        bar.progress(p.fraction, text=text)
        last["seconds"] = p.seconds
        cells[0].metric("Directions found", f"{p.directions_done} / {p.n_layers * p.k}")
        cells[1].metric(
            "Lens influence (bits)", "—" if p.objective_bits is None else f"{p.objective_bits:.4f}"
        )
        cells[2].metric("ETA (directions)", jobs.eta_text(p.eta_seconds))
        cells[3].metric("Elapsed", jobs.eta_text(p.seconds))

    result = S.report(
        jobs.extract_basis, model, tuned, int(layer), config, corpus, out, on_progress=show
    )
    if result is None:
        record["status"] = "failed"
        st.stop()
    record.update(status="done", seconds=last.get("seconds", 0.0))
    st.session_state[S.LENS_PATHS][S.CAUSAL_KIND] = str(out)
    st.rerun()
