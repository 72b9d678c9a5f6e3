"""Train: a tuned lens for the session's model on a corpus, with live progress, stop and resume.

The widgets' defaults come from ``lenskit.training.QUICK`` (a quick run of ``TrainConfig``).
"""

import time

import pandas as pd
import streamlit as st

import lenskit_app.state as S
from lenskit import plotting
from lenskit.corpora import is_builtin
from lenskit.training import CHECKPOINT_FILE, QUICK, TrainConfig, delete_unfinished, holder
from lenskit_app import jobs, loaders, widgets
from lenskit_app.paths import corpus_path, describe_roots, folder_name, next_lens_dir, out_path

RESUME_NOW = "train_resume_now"  # set by an unfinished run's Resume button

st.title("Train a tuned lens")
name, device, dtype = S.model_key()
model = S.guard(loaders.load_model, name, device, dtype)
adapter = loaders.adapter(model)
st.caption(
    "A closed-form start, then KL fine-tuning toward the model's own output (as `lenskit "
    "train` does). The defaults are a quick run (a few minutes for smollm2-135m on two CPU "
    "cores); more tokens, or a budget in minutes, make a better lens."
)

# A run still marked running was cut short: Stop (or any other click) reruns the page,
# which interrupts the script at its next progress update, after a checkpoint is written.
record = st.session_state.get(S.TRAIN)
if record and record["status"] == "running":
    record["status"] = "stopped"

corpus = widgets.corpus_section("train", default=QUICK.data)
c1, c2, c3 = st.columns(3)
seq_len = c1.number_input(
    "Tokens per sequence", 2, adapter.n_ctx, min(QUICK.seq_len, adapter.n_ctx)
)
tokens_per_step = c2.number_input(
    "Tokens per step",
    1,
    1 << 20,
    QUICK.tokens_per_step,
    help="A multiple of the tokens per sequence.",
)
tokens = c3.number_input(
    "Fine-tuning tokens",
    0,
    1 << 30,
    QUICK.tokens,
    step=256,
    help="KL fine-tuning budget, in whole steps; 0: the closed-form start only.",
)
with st.expander("More settings"):
    d1, d2, d3, d4, d5 = st.columns(5)
    lstsq_tokens = d1.number_input("Closed-form tokens", 2, 1 << 30, QUICK.lstsq_tokens, step=1024)
    eval_tokens = d2.number_input(
        "Held-out tokens (report)", 2, 1 << 30, QUICK.eval_tokens, step=256
    )
    val_tokens = d3.number_input(
        "Validation tokens",
        0,
        1 << 30,
        QUICK.val_tokens,
        step=128,
        help="Choose per layer between start and fine-tuned "
        "translator; 0: always keep the fine-tuned one.",
    )
    seed = d4.number_input("Seed", 0, 1 << 31, QUICK.seed)
    minutes = d5.number_input(
        "Minutes",
        0.0,
        10000.0,
        QUICK.minutes,
        help=TrainConfig.__dataclass_fields__["minutes"].metadata["help"].replace("--", ""),
    )
    sublayer = adapter.has_mid and st.checkbox(
        "Sub-layer rows (attention → MLP)",
        help=TrainConfig.__dataclass_fields__["points"].metadata["help"],
    )

out_key = f"train_out_{folder_name(name)}"
if out_key not in st.session_state or (
    record and record["status"] == "done" and record["out"] == st.session_state[out_key]
):  # a fresh folder, also after a run finished in the one shown
    st.session_state[out_key] = str(next_lens_dir(name))

runs = jobs.unfinished_runs(name)
if runs:
    with st.expander(f"Unfinished runs ({len(runs)})", expanded=True):
        for run in runs:
            r1, r2, r3 = st.columns([6, 1, 1])
            saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.mtime))
            what = (
                "unreadable checkpoint"
                if run.config is None
                else f"{run.config.model}, {run.config.tokens:,} fine-tuning tokens"
            )
            busy = f"; in use by {run.in_use}" if run.in_use else ""
            r1.markdown(f"`{run.path}` — {what}, saved {saved}{busy}")
            other = run.config is None or run.config.model != adapter.name
            if r2.button("Resume", key=f"resume_{run.path}", disabled=bool(run.in_use) or other):
                st.session_state[out_key] = str(run.path)
                st.session_state[RESUME_NOW] = True
                st.rerun()
            if r3.button("Delete", key=f"delete_{run.path}", disabled=bool(run.in_use)):
                if S.report(delete_unfinished, run.path) is None and run.path.exists():
                    st.stop()
                st.rerun()

out_text = st.text_input(
    "Output folder",
    key=out_key,
    help=f"A new folder for the lens, under {describe_roots()}. Lenses saved under "
    f"lenses/{folder_name(name)}/ there are listed in the Home page's lens picker.",
)
out = widgets.checked_path(out_path, out_text, "train_out")
if out is None:  # the error is shown in place; the form stays, Start waits for a folder
    st.button("Start", type="primary", disabled=True)
    st.stop()

if record and record["status"] == "done" and record["model"] == name:
    st.success(
        f"Trained {record['out']} in {record['seconds']:.0f} s: mean held-out KL "
        f"{record['tuned']:.3f} bits (logit lens {record['logit']:.3f}). It is now the tuned "
        "lens on every page."
    )
    frame = pd.DataFrame(record["per_layer"])
    st.plotly_chart(plotting.training_lines(frame), width="stretch", theme=None)

resumable, checkpoint, busy = False, out / CHECKPOINT_FILE, holder(out)
stopped = bool(record and record["status"] == "stopped" and record["out"] == str(out))
if busy:
    st.warning(
        f"A training run is using {out} ({busy})"
        + (": it is writing its checkpoint after the stop." if stopped else ".")
        + " Refresh when it has ended."
    )
    st.button("Refresh")
elif (out / "config.json").is_file():
    st.info(f"{out} holds a trained lens: choose another output folder to train a new one.")
    if st.button("Use this lens as the tuned lens"):
        st.session_state[S.LENS_PATHS]["tuned"] = str(out)
        st.success(f"{out} is now the tuned lens on every page.")
elif checkpoint.is_file():
    old = S.guard(jobs.checkpoint_config, str(out), checkpoint.stat().st_mtime_ns)
    if old.model != adapter.name:
        st.error(
            f"The unfinished run in {out} is for {old.model}, not {adapter.name}: choose "
            "that model on Home, or another output folder."
        )
    else:
        st.warning(
            ("Training stopped; its checkpoint is saved. " if stopped else "")
            + f"{out} holds an unfinished run ({old.tokens:,} fine-tuning tokens on "
            f"{old.data or 'builtin:shakespeare'}): Resume continues it with its own "
            "settings; choose another output folder to start afresh."
        )
        resumable = True
elif stopped:
    st.warning(
        "Training stopped before any work was done (nothing to keep): press Start to begin again."
    )

b1, b2 = st.columns(2)
blocked = bool(busy) or resumable or (out / "config.json").exists() or widgets.form_blocked("train")
start = b1.button("Start", type="primary", disabled=blocked)
resume = b2.button("Resume", disabled=not resumable or bool(busy))
resume = resume or (st.session_state.pop(RESUME_NOW, False) and resumable and not busy)
if not (start or resume):
    st.stop()

if resume:
    config = S.guard(jobs.checkpoint_config, str(out), checkpoint.stat().st_mtime_ns)
    if config.data is not None and not is_builtin(config.data):  # check its corpus path
        S.guard(corpus_path, config.data)
else:
    config = S.guard(
        TrainConfig,
        **{
            **QUICK.to_dict(),
            "model": adapter.name,
            "data": corpus,
            "tokens": int(tokens),
            "minutes": float(minutes),
            "seq_len": int(seq_len),
            "tokens_per_step": int(tokens_per_step),
            "lstsq_tokens": int(lstsq_tokens),
            "eval_tokens": int(eval_tokens),
            "val_tokens": int(val_tokens),
            "seed": int(seed),
            "device": device,
            "dtype": dtype,
            "points": "resid_pre,resid_mid" if sublayer else "resid_pre",
        },
    )

record = {"out": str(out), "model": name, "status": "running"}
st.session_state[S.TRAIN] = record
st.button(
    "Stop training",
    help="Stops at the next step; the checkpoint keeps the work and Resume continues it.",
)
bar = st.progress(0.0, text="Reading and tokenizing the corpus…")
cells = [column.empty() for column in st.columns(4)]
PHASES = {
    "closed-form": "Closed-form start",
    "fine-tune": "KL fine-tuning",
    "score": "Scoring on held-out text",
}


def show(p):
    """Draw a progress report (each draw is where a Stop click interrupts the run)."""
    done = " — done" if p.fraction >= 1 and p.phase != "score" else ""
    bar.progress(
        p.fraction, text=f"{PHASES.get(p.phase, p.phase)}: {p.done:,} / {p.total:,} tokens{done}"
    )
    cells[0].metric("Tokens/s", f"{p.tokens_per_s:,.0f}")
    cells[1].metric("KL (bits)", "—" if p.kl_bits is None else f"{p.kl_bits:.3f}")
    cells[2].metric("ETA (this phase)", jobs.eta_text(p.eta_seconds))
    cells[3].metric("Elapsed", jobs.eta_text(p.seconds))


result = S.report(jobs.train_lens, model, config, out, resume=resume, on_progress=show)
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
