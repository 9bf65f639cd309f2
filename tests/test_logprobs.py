"""`trl_gae_ext.logprobs.chunked_logprobs` against the unchunked path (`lm_head(hidden).float() / T` then TRL's
`selective_log_softmax` / `entropy_from_logits`): equal log-probs, entropies and gradients, and a peak of live
tensor memory below one `[B, T, V]` float32 logits tensor where the unchunked path exceeds it."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from trl_gae_ext.logprobs import _ChunkedLinearLogProbs, chunked_logprobs


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "logprobs.py"
    spec = importlib.util.spec_from_file_location("benchmark_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(hidden, head, targets, temperature=1.0, mask=None, entropy_grad=False):
    """The unchunked path: full logits, float32, TRL's functions; masked positions 0 (and no gradient)."""
    logits = (F.linear(hidden, head) if isinstance(head, torch.Tensor) else head(hidden)).float() / temperature
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    logprobs = selective_log_softmax(logits, targets.masked_fill(~mask, 0), row_mask=mask)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits).masked_fill(~mask, 0.0)
    return logprobs, entropy


def run_and_grad(fn, hidden, params, upstream, entropy_upstream=None):
    """Run `fn() -> (logprobs, entropy)`, backprop `sum(g * logprobs [+ g_H * entropy])`, return outputs and grads."""
    for t in (hidden, *params):
        t.grad = None
    logprobs, entropy = fn()
    loss = (logprobs * upstream).sum()
    if entropy_upstream is not None:
        loss = loss + (entropy * entropy_upstream).sum()
    loss.backward()
    return logprobs.detach(), entropy.detach(), [t.grad.clone() for t in (hidden, *params)]


def make_head(kind, H, V, bias, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(H, V, bias=bias).to(dtype)
    if kind == "linear":
        return linear, list(linear.parameters())
    if kind == "weight":
        return linear.weight, [linear.weight]
    # Any other module goes through the checkpointed fallback.
    module = torch.nn.Sequential(linear)
    return module, list(module.parameters())


# (head kind, bias, temperature, chunk_size, masked): B=3, T=7 (21 positions, ~14 unmasked)
CASES = {
    "linear": ("linear", False, 1.0, 4, False),
    "bias-temperature": ("linear", True, 0.7, 5, False),
    "masked-uneven-chunks": ("linear", True, 0.7, 3, True),
    "chunk-ge-length": ("linear", True, 1.3, 1000, True),
    "chunk-1": ("linear", False, 0.7, 1, True),
    "weight-tensor": ("weight", False, 0.7, 4, True),
    "module-fallback": ("module", True, 0.7, 4, True),
    "module-fallback-one-chunk": ("module", False, 1.0, 64, False),
}


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["entropy-stat", "entropy-grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_unchunked_fp32(case, entropy_grad):
    kind, bias, temperature, chunk_size, masked = CASES[case]
    B, T, H, V = 3, 7, 16, 50
    head, params = make_head(kind, H, V, bias)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    mask = torch.rand(B, T, generator=g) > 0.3 if masked else None
    targets = torch.randint(0, V, (B, T), generator=g)
    if masked:
        targets = targets.masked_fill(~mask, -100)  # padding ids are never read
    upstream, entropy_upstream = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    if not entropy_grad:
        entropy_upstream = None

    def chunked():
        out = chunked_logprobs(hidden, head, targets, temperature, mask, chunk_size, True, entropy_grad)
        assert out.entropy.requires_grad == entropy_grad  # a detached statistic unless asked: no graph kept
        return out

    got = run_and_grad(chunked, hidden, params, upstream, entropy_upstream)
    want = run_and_grad(
        lambda: reference(hidden, head, targets, temperature, mask, entropy_grad),
        hidden,
        params,
        upstream,
        entropy_upstream,
    )
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if masked:
        assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()
        assert (got[2][0][~mask] == 0).all()  # no gradient reaches padding's hidden states


def test_logprobs_only_and_frozen_head():
    """The common PPO case: frozen lm_head, no entropy; the gradient reaches only the hidden states."""
    B, T, H, V = 2, 9, 16, 40
    head, _ = make_head("linear", H, V, bias=True)
    head.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)
    out = chunked_logprobs(hidden, head, targets, temperature=0.7, chunk_size=4)
    assert out.entropy is None
    (grad,) = torch.autograd.grad((out.logprobs * upstream).sum(), hidden)
    want, _ = reference(hidden, head, targets, temperature=0.7)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), hidden)
    torch.testing.assert_close(out.logprobs, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)
    assert head.weight.grad is None
    with torch.no_grad():  # scoring: no graph, same numbers
        torch.testing.assert_close(chunked_logprobs(hidden, head, targets, 0.7, chunk_size=3).logprobs, want.detach())


def test_gradcheck_float64():
    """The hand-written backward (log-prob and entropy terms, weight, bias, temperature) against finite differences."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (6,), generator=g)

    def fn(h, w, b):
        return _ChunkedLinearLogProbs.apply(h, w, b, targets, 0.7, 4, torch.float64, True, True)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    # Only one output in the loss: the other's upstream gradient is None, not zeros.
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[0], (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[1], (hidden, weight, bias))


@pytest.mark.parametrize("head_kind", ["linear", "module"])
def test_bf16_matches_same_math(head_kind):
    """bf16 hidden states and lm_head: same as the bf16 projection upcast to float32 (what the model's logits give)."""
    B, T, H, V = 2, 11, 32, 64
    head, params = make_head(head_kind, H, V, bias=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, T, H, generator=g).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream, entropy_upstream = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    got = run_and_grad(
        lambda: chunked_logprobs(hidden, head, targets, 0.7, None, 5, True, True),
        hidden,
        params,
        upstream,
        entropy_upstream,
    )
    want = run_and_grad(
        lambda: reference(hidden, head, targets, 0.7, entropy_grad=True), hidden, params, upstream, entropy_upstream
    )
    assert got[0].dtype == torch.float32 and got[2][0].dtype == torch.bfloat16
    # Forward: identical bf16 logits per row, then the same float32 math.
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # Backward: bf16 matmuls; the weight/bias gradients are summed per chunk (in float32) instead of in one matmul.
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_autocast_matches_linear_under_autocast():
    """Under `torch.autocast` the projection runs in the autocast dtype, also when backward runs outside it."""
    B, T, H, V = 2, 6, 32, 48
    head, params = make_head("linear", H, V, bias=True)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)

    def under_autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()

        return run

    got = run_and_grad(
        under_autocast(lambda: chunked_logprobs(hidden, head, targets, 0.7, None, 4, True)), hidden, params, upstream
    )
    want = run_and_grad(under_autocast(lambda: reference(hidden, head, targets, 0.7)), hidden, params, upstream)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[2][0].dtype == torch.float32 and got[2][1].dtype == torch.float32
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _tiny_causal_lm(tie: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(config).float()


def _model_grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_tied_embedding_gradients_match_model_logits():
    """A tied embedding/lm_head: the shared weight gets both gradients, as through the model's own logits."""
    model = _tiny_causal_lm(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, 97, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    mask = attention_mask[:, 1:].bool()
    upstream = torch.randn(3, 11, generator=g)

    def chunked():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = chunked_logprobs(hidden[:, :-1], model.lm_head, input_ids[:, 1:], 0.7, mask, chunk_size=4)
        (out.logprobs * upstream).sum().backward()
        return out.logprobs.detach()

    def unchunked():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / 0.7
        logprobs = selective_log_softmax(logits, input_ids[:, 1:], row_mask=mask)
        (logprobs * upstream).sum().backward()
        return logprobs.detach()

    got, got_grads = _model_grads(model, chunked)
    want, want_grads = _model_grads(model, unchunked)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and "model.embed_tokens.weight" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_peft_lora_lm_head_uses_the_adapter():
    """A LoRA-wrapped lm_head is not a plain linear layer: it is called as is (checkpointed), so the adapter's delta
    is in the log-probs and its parameters get the unchunked path's gradients."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_causal_lm(tie=False), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    lm_head = model.base_model.model.lm_head
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 97, (2, 9), generator=g)
    upstream = torch.randn(2, 9, generator=g)
    params = [p for p in lm_head.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A, lora_B

    got = run_and_grad(
        lambda: chunked_logprobs(hidden, lm_head, targets, 0.7, None, 4, True), hidden, params, upstream
    )
    want = run_and_grad(lambda: reference(hidden, lm_head, targets, 0.7), hidden, params, upstream)
    without_adapter, _ = reference(hidden, lm_head.base_layer, targets, 0.7)
    assert (got[0] - without_adapter.detach()).abs().max() > 1e-3  # the adapter changes the numbers
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_everything_masked():
    head, params = make_head("linear", 8, 20, bias=True)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = chunked_logprobs(hidden, head, torch.full((2, 3), -100), mask=mask, return_entropy=True)
    assert out.logprobs.shape == (2, 3) and (out.logprobs == 0).all() and (out.entropy == 0).all()
    out.logprobs.sum().backward()
    assert (hidden.grad == 0).all() and all(p.grad is None or (p.grad == 0).all() for p in params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "leading dims"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
        (dict(hidden=torch.randn(2, 3, 8, dtype=torch.bfloat16)), "autocast"),
        (dict(lm_head=torch.randn(20, 6)), r"\[V, H=8\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(
        hidden=torch.randn(2, 3, 8), lm_head=torch.nn.Linear(8, 20), targets=torch.zeros(2, 3, dtype=torch.long)
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chunked_logprobs(**args)


# B=4, T=64, V=8192: one float32 [B, T, V] logits tensor is 8 MiB; H=64, so the lm_head weight is 2 MiB.
MEM_B, MEM_T, MEM_H, MEM_V = 4, 64, 64, 8192
LOGITS_BYTES = 4 * MEM_B * MEM_T * MEM_V


@pytest.mark.parametrize("head_kind, trainable", [("linear", False), ("linear", True), ("module", False)])
def test_peak_memory_below_one_logits_tensor(head_kind, trainable):
    """Forward + backward (log-probs with gradient, entropy as a statistic): the chunked path's peak of live tensors
    created during the step stays below half of one [B, T, V] float32 logits tensor (chunks of 16 tokens: 0.5 MiB
    each; a trainable head adds its 2 MiB gradient), while the unchunked path holds several such tensors."""
    tracker = _load_benchmark()
    head, _ = make_head(head_kind, MEM_H, MEM_V, bias=False)
    head.requires_grad_(trainable)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(MEM_B, MEM_T, MEM_H, generator=g, requires_grad=True)
    targets = torch.randint(0, MEM_V, (MEM_B, MEM_T), generator=g)
    upstream = torch.randn(MEM_B, MEM_T, generator=g)

    def step(fn):
        def run():
            logprobs, _ = fn()
            (logprobs * upstream).sum().backward()

        return tracker.peak_live_bytes(run)

    chunked = step(lambda: chunked_logprobs(hidden, head, targets, 0.7, chunk_size=16, return_entropy=True))
    unchunked = step(lambda: reference(hidden, head, targets, 0.7))
    assert unchunked > LOGITS_BYTES, unchunked
    assert chunked < LOGITS_BYTES / 2, (chunked, LOGITS_BYTES)


def test_benchmark_runs(capsys):
    """The benchmark script at a tiny size prints one row with a memory ratio below 1."""
    _load_benchmark().main(["--sizes", "16x2048", "--hidden-size", "32", "--chunk-size", "16", "--repeats", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:2] == ["16", "2048"] and float(row[5]) < 1.0
