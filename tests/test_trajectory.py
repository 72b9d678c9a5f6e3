"""Every trajectory statistic against a brute-force float64 reference."""

import json
import math

import pytest
import torch

import lenskit
from lenskit.errors import LenskitError
from lenskit.residual import capture, tokenize

PROMPT = "Layer by layer, the prediction forms."
LN2 = math.log(2)


def _reference(model, lens, prompt, target_id):
    tokens = tokenize(model, prompt)
    cap = capture(model, tokens)
    rows = cap.lens_rows()[:, 0]
    n_rows = rows.shape[0]
    with torch.no_grad():
        logits = [lens(rows[r], r) for r in range(n_rows - 1)] + [cap.logits[0]]
    lp_final = torch.log_softmax(cap.logits[0].double(), -1)
    out = {"entropy": [], "kl": [], "ce": [], "tprob": [], "trank": [], "top": []}
    nxt = tokens[0, 1:]
    for z in logits:
        z = z.double()
        lq = torch.log_softmax(z, -1)
        q = lq.exp()
        out["entropy"].append(-(q * lq).sum(-1) / LN2)
        out["kl"].append((lp_final.exp() * (lp_final - lq)).sum(-1) / LN2)
        ce = torch.full((z.shape[0],), math.nan, dtype=torch.float64)
        ce[:-1] = -lq[:-1].gather(-1, nxt[:, None]).squeeze(-1) / LN2
        out["ce"].append(ce)
        out["tprob"].append(q[:, target_id])
        out["trank"].append(torch.tensor([int((row > row[target_id]).sum()) for row in z]))
        out["top"].append(torch.argsort(z, -1, descending=True)[:, :3])
    return {k: torch.stack(v) for k, v in out.items()}


def test_statistics_equal_float64_reference(tiny_model):
    lens = lenskit.get_lens("logit", tiny_model)
    traj = lenskit.trajectory(tiny_model, lens, PROMPT, target="e", top_k=3)
    ref = _reference(tiny_model, lens, PROMPT, traj.target_id)
    for ours, theirs in [
        (traj.entropy, ref["entropy"]),
        (traj.kl_to_final, ref["kl"]),
        (traj.target_prob, ref["tprob"]),
    ]:
        assert (ours.double() - theirs).abs().max().item() < 1e-5
    ce = traj.cross_entropy.double()
    assert torch.isnan(ce[:, -1]).all() and torch.isnan(ref["ce"][:, -1]).all()
    assert (ce[:, :-1] - ref["ce"][:, :-1]).abs().max().item() < 1e-5
    assert torch.equal(traj.target_rank, ref["trank"])
    assert torch.equal(traj.top_ids, ref["top"])
    probs = torch.softmax(torch.stack([ref["top"].double()]), -1)  # shapes only
    assert probs.shape[-1] == 3


def test_output_row_is_the_model(tiny_llama):
    lens = lenskit.get_lens("logit", tiny_llama)
    traj = lenskit.trajectory(tiny_llama, lens, PROMPT)
    logits = tiny_llama(tokenize(tiny_llama, PROMPT))[0]
    assert traj.layer_labels[-1] == "output" and len(traj.layer_labels) == 5
    assert torch.equal(traj.top_ids[-1, :, 0], logits.argmax(-1))
    assert traj.kl_to_final[-1].abs().max().item() < 1e-5
    torch.testing.assert_close(traj.top_probs[-1, :, 0], torch.softmax(logits, -1).max(-1).values)


def test_top_probs_sorted_and_tokens(tiny_llama):
    traj = lenskit.trajectory(tiny_llama, lenskit.get_lens("logit", tiny_llama), "abc", top_k=4)
    assert traj.tokens == ("<|endoftext|>", "a", "b", "c")
    assert traj.next_tokens == ("a", "b", "c", None)
    assert (traj.top_probs[..., :-1] >= traj.top_probs[..., 1:]).all()
    assert traj.top_tokens[0][1][0] == tiny_llama.tokenizer.decode([int(traj.top_ids[0, 1, 0])])


def test_to_frame_and_json(tiny_llama):
    traj = lenskit.trajectory(
        tiny_llama, lenskit.get_lens("logit", tiny_llama), "abc", target="d", top_k=2
    )
    frame = traj.to_frame()
    assert len(frame) == 5 * 4
    assert {
        "layer",
        "pos",
        "top1_token",
        "entropy_bits",
        "kl_to_final_bits",
        "cross_entropy_bits",
        "target_prob",
        "target_rank",
        "topk_tokens",
    } <= set(frame)
    cell = frame[(frame.layer == 2) & (frame.pos == 1)].iloc[0]
    assert cell.entropy_bits == pytest.approx(float(traj.entropy[2, 1]))
    assert cell.target_rank == int(traj.target_rank[2, 1])
    data = json.loads(json.dumps(traj.to_dict()))
    assert data["units"] == "bits" and len(data["cells"]) == 20
    assert data["cells"][3]["cross_entropy_bits"] is None  # the last position has no next token


def test_trajectory_errors(tiny_llama, tiny_gpt2):
    lens = lenskit.get_lens("logit", tiny_llama)
    with pytest.raises(LenskitError, match="empty"):
        lenskit.trajectory(tiny_llama, lens, "")
    with pytest.raises(LenskitError, match="longer than the model's context"):
        lenskit.trajectory(tiny_llama, lens, "x" * 500)
    with pytest.raises(LenskitError, match="is 2 tokens"):
        lenskit.trajectory(tiny_llama, lens, "abc", target="ab")
    with pytest.raises(LenskitError, match="top_k"):
        lenskit.trajectory(tiny_llama, lens, "abc", top_k=0)
    with pytest.raises(LenskitError, match="another model"):
        lenskit.trajectory(tiny_gpt2, lens, "abc")


@pytest.mark.slow
def test_smollm2_paris_trajectory(smollm2):
    traj = lenskit.trajectory(
        smollm2, lenskit.get_lens("logit", smollm2), "The capital of France is", target=" Paris"
    )
    assert traj.top_tokens[-1][-1][0] == " Paris"
    assert int(traj.target_rank[-1, -1]) == 0
    assert traj.kl_to_final[:-1, -1].min().item() > 0
    assert traj.target_rank[0, -1] > traj.target_rank[-2, -1]
