import pytest
import torch

from lenskit.errors import LenskitError
from lenskit.residual import capture, hook_names, residual_stack, tokenize


def _no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_capture_matches_run_with_cache(tiny_model):
    tokens = tokenize(tiny_model, "The quick brown fox")
    cap = capture(tiny_model, tokens, points=("resid_pre", "resid_mid", "attn_out", "mlp_out"))
    logits, cache = tiny_model.run_with_cache(tokens)
    n = tiny_model.cfg.n_layers
    for point in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
        for i, name in enumerate(hook_names(n, point)):
            torch.testing.assert_close(cap.stack(point)[i], cache[name], rtol=0, atol=0)
    torch.testing.assert_close(cap.final, cache[f"blocks.{n - 1}.hook_resid_post"])
    torch.testing.assert_close(cap.logits, logits)
    assert _no_hooks(tiny_model)


def test_sub_layer_points_add_up(tiny_model):
    tokens = tokenize(tiny_model, "adding up")
    cap = capture(
        tiny_model, tokens, points=("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post")
    )
    pre, mid, post = cap.stack("resid_pre"), cap.stack("resid_mid"), cap.stack("resid_post")
    torch.testing.assert_close(mid, pre + cap.stack("attn_out"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, mid + cap.stack("mlp_out"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre[1:], post[:-1])


def test_lens_rows_are_block_inputs_then_final(tiny_llama):
    tokens = tokenize(tiny_llama, "rows")
    stack, logits = residual_stack(tiny_llama, tokens)
    cap = capture(tiny_llama, tokens)
    assert stack.shape[0] == tiny_llama.cfg.n_layers + 1
    torch.testing.assert_close(stack[-1], cap.final)
    torch.testing.assert_close(stack[:-1], cap.stack())
    assert logits.shape[-1] == 257


def test_hooks_removed_on_error(tiny_llama):
    bad = torch.tensor([[1, 2, 100_000]])  # an id outside the vocabulary
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward pass
        capture(tiny_llama, bad)
    assert _no_hooks(tiny_llama)


def test_uncaptured_point_and_unknown_point(tiny_llama):
    cap = capture(tiny_llama, tokenize(tiny_llama, "x"))
    with pytest.raises(LenskitError, match="was not captured"):
        cap.stack("mlp_out")
    with pytest.raises(LenskitError, match="unknown residual point"):
        hook_names(4, "resid_sideways")


def test_tokenize_checks(tiny_llama):
    with pytest.raises(LenskitError, match="empty"):
        tokenize(tiny_llama, "  ")
    with pytest.raises(LenskitError, match="longer than the model's context of 128"):
        tokenize(tiny_llama, "a" * 200)
    assert tokenize(tiny_llama, [5, 6, 7]).shape == (1, 3)
    assert tokenize(tiny_llama, "ab")[0, 0].item() == tiny_llama.tokenizer.bos_token_id


def test_threads_sharing_a_model_each_get_their_own_activations(tiny_llama):
    """Two app sessions share one model object: their hooked passes must not mix."""
    import threading

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (1, n), generator=gen) for n in (5, 9, 13, 17)]
    want = [capture(tiny_llama, t).lens_rows() for t in prompts]
    barrier, errors = threading.Barrier(len(prompts)), []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(15):
                got = capture(tiny_llama, prompts[i]).lens_rows()
                torch.testing.assert_close(got, want[i])
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_an_autocast_capture_keeps_the_models_dtype_and_is_near_float32(tiny_llama):
    tokens = tiny_llama.to_tokens("The tuned lens reads every layer of the model.")
    exact = capture(tiny_llama, tokens)
    fast = capture(tiny_llama, tokens, autocast=torch.bfloat16)
    assert fast.final.dtype == fast.logits.dtype == fast.stack("resid_pre").dtype == torch.float32
    assert not torch.equal(fast.final, exact.final)  # the matmuls did run in bfloat16
    rel = (fast.final - exact.final).norm() / exact.final.norm()
    assert rel < 0.05
    assert torch.equal(capture(tiny_llama, tokens).final, exact.final)  # no autocast left on
