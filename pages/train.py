"""Train: a tuned lens for the session's model on a corpus, with live progress, stop and resume."""

import pandas as pd
import streamlit as st

import lenskit_app.state as S
from lenskit.training import CHECKPOINT_FILE, TrainConfig
from lenskit_app.paths import corpus_path, describe_roots, folder_name, next_lens_dir, out_path

st.title("Train a tuned lens")
name, device, dtype = S.model_key()
model = S.guard(S.load_model, name, device, dtype)
adapter = S.adapter(model)
st.caption(
    "A closed-form start, then KL fine-tuning toward the model's own output (as `lenskit "
    "train` does). The defaults take about five minutes for smollm2-135m on two CPU cores; "
    "more tokens make a better lens."
)

# A run still marked running was cut short: Stop (or any other click) reruns the page,
# which interrupts the script at its next progress update, after a checkpoint is written.
record = st.session_state.get(S.TRAIN)
if record and record["status"] == "running":
    record["status"] = "stopped"

corpus = S.corpus_section("train")
c1, c2, c3 = st.columns(3)
seq_len = c1.number_input("Tokens per sequence", 2, adapter.n_ctx, min(128, adapter.n_ctx))
tokens_per_step = c2.number_input(
    "Tokens per step", 1, 1 << 20, 256, help="A multiple of the tokens per sequence."
)
tokens = c3.number_input(
    "Fine-tuning tokens",
    0,
    1 << 30,
    2048,
    step=256,
    help="KL fine-tuning budget, in whole steps; 0: the closed-form start only.",
)
with st.expander("More settings"):
    d1, d2, d3, d4 = st.columns(4)
    lstsq_tokens = d1.number_input("Closed-form tokens", 2, 1 << 30, 8192, step=1024)
    eval_tokens = d2.number_input("Held-out tokens (report)", 2, 1 << 30, 1024, step=256)
    val_tokens = d3.number_input(
        "Validation tokens",
        0,
        1 << 30,
        256,
        step=128,
        help="Choose per layer between start and fine-tuned "
        "translator; 0: always keep the fine-tuned one.",
    )
    seed = d4.number_input("Seed", 0, 1 << 31, 0)

out_key = f"train_out_{folder_name(name)}"
if out_key not in st.session_state or (
    record and record["status"] == "done" and record["out"] == st.session_state[out_key]
):  # a fresh folder, also after a run finished in the one shown
    st.session_state[out_key] = str(next_lens_dir(name))
out_text = st.text_input(
    "Output folder",
    key=out_key,
    help=f"A new folder for the lens, under {describe_roots()}. Lenses saved under "
    f"lenses/{folder_name(name)}/ there are listed in the Home page's lens picker.",
)
out = S.guard(out_path, out_text)

if record and record["status"] == "done" and record["model"] == name:
    st.success(
        f"Trained {record['out']} in {record['seconds']:.0f} s: mean held-out KL "
        f"{record['tuned']:.3f} bits (logit lens {record['logit']:.3f}). It is now the tuned "
        "lens on every page."
    )
    frame = pd.DataFrame(record["per_layer"]).set_index("layer")
    st.line_chart(frame, x_label="layer", y_label="held-out KL (bits)")

resumable, checkpoint = False, out / CHECKPOINT_FILE
if (out / "config.json").is_file():
    st.info(f"{out} holds a trained lens: choose another output folder to train a new one.")
    if st.button("Use this lens as the tuned lens"):
        st.session_state[S.LENS_PATHS]["tuned"] = str(out)
        st.success(f"{out} is now the tuned lens on every page.")
elif checkpoint.is_file():
    old = S.guard(S.checkpoint_config, str(out), checkpoint.stat().st_mtime_ns)
    if old.model != adapter.name:
        st.error(
            f"The unfinished run in {out} is for {old.model}, not {adapter.name}: choose "
            "that model on Home, or another output folder."
        )
    else:
        stopped = record and record["status"] == "stopped" and record["out"] == str(out)
        st.warning(
            ("Training stopped. " if stopped else "")
            + f"{out} holds an unfinished run ({old.tokens:,} fine-tuning tokens on "
            f"{old.data or 'Shakespeare'}): Resume continues it with its own settings; choose "
            "another output folder to start afresh."
        )
        resumable = True
elif record and record["status"] == "stopped" and record["out"] == str(out):
    st.warning("Training stopped before its first checkpoint: press Start to begin again.")

b1, b2 = st.columns(2)
start = b1.button("Start", type="primary", disabled=resumable or (out / "config.json").exists())
resume = b2.button("Resume", disabled=not resumable)
if not (start or resume):
    st.stop()

if resume:
    config = S.guard(S.checkpoint_config, str(out), checkpoint.stat().st_mtime_ns)
    if config.data is not None:  # the checkpoint may come from elsewhere: check its corpus
        S.guard(corpus_path, config.data)
else:
    config = S.guard(
        TrainConfig,
        model=adapter.name,
        data=corpus,
        tokens=int(tokens),
        seq_len=int(seq_len),
        tokens_per_step=int(tokens_per_step),
        lstsq_tokens=int(lstsq_tokens),
        eval_tokens=int(eval_tokens),
        val_tokens=int(val_tokens),
        seed=int(seed),
        checkpoint_every=5,
        device=device,
        dtype=dtype,
    )

record = {"out": str(out), "model": name, "status": "running"}
st.session_state[S.TRAIN] = record
st.button(
    "Stop training",
    help="Stops at the next step; the checkpoint keeps the work and Resume continues it.",
)
bar = st.progress(0.0, text="Reading and tokenizing the corpus…")
cells = [column.empty() for column in st.columns(4)]
PHASES = {"closed-form": "Closed-form start", "fine-tune": "KL fine-tuning"}


def show(p):
    """Draw a progress report (each draw is where a Stop click interrupts the run)."""
    done = " — done; scoring the lens…" if p.fraction >= 1 else ""
    bar.progress(p.fraction, text=f"{PHASES[p.phase]}: {p.done:,} / {p.total:,} tokens{done}")
    cells[0].metric("Tokens/s", f"{p.tokens_per_s:,.0f}")
    cells[1].metric("KL (bits)", "—" if p.kl_bits is None else f"{p.kl_bits:.3f}")
    cells[2].metric("ETA (this phase)", S.eta_text(p.eta_seconds))
    cells[3].metric("Elapsed", S.eta_text(p.seconds))


result = S.report(S.train_lens, model, config, out, resume=resume, on_progress=show)
if result is None:
    record["status"] = "failed"
    st.stop()
n = len(result.logit_kl)
record.update(
    status="done",
    seconds=result.seconds,
    logit=sum(result.logit_kl) / n,
    tuned=sum(result.tuned_kl) / n,
    per_layer=result.to_frame().to_dict(orient="list"),
)
st.session_state[S.LENS_PATHS]["tuned"] = str(out)
st.rerun()
