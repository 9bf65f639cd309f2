"""Per-token log-probabilities (and entropies) of target tokens computed from the last hidden states, chunk by
chunk, so that the full-vocabulary logits `[B, T, V]` never exist in float32 (nor in the model's dtype).

The unchunked path a PPO step takes today is `logits = lm_head(hidden)`, `logits.float() / temperature`, then TRL's
`selective_log_softmax` (and `entropy_from_logits`). With a 150k vocabulary that float32 tensor, its log-softmax and
their gradients are the largest item of a step (`docs/memory.md`, item 8). `chunked_logprobs` computes the same
numbers one chunk of `c` tokens at a time: projection -> / temperature -> float32 log-softmax -> gather (-> entropy),
keeping only `[N]`-sized results, and its backward recomputes each chunk's logits instead of storing them, so one
chunk's `[c, V]` logits is alive at a time in forward and in backward.

Why recompute in backward: Liger's fused linear cross-entropy computes the gradients during the forward pass, which
works because its output is a scalar loss (backward only scales them by one upstream number). Per-token log-probs
feed a PPO loss whose per-token gradients are only known in backward, so the chunk's logits are rebuilt there; the
saved `[N]` log-sum-exp makes the rebuilt softmax one `exp` away. torchtune's chunked cross-entropy upcasts chunks
of logits the model already produced, which saves the float32 copy but not the logits themselves.

Notation:
    N   number of tokens (B * T, or the unmasked ones when a mask is given)
    H   hidden size, V vocabulary size, c chunk size (tokens per chunk)
    z   scaled logits `lm_head(h) / temperature` in float32 (float64 for float64 inputs)
    p   softmax(z); log p_y = z_y - logsumexp(z); entropy = -sum_v p_v log p_v

Gradients (per token, `g` the upstream gradient of the log-prob, `g_H` that of the entropy):
    d log p_y / dz = onehot(y) - p;   d entropy / dz = -p * (log p + entropy)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


DEFAULT_CHUNK_SIZE = 512


class TokenLogProbs(NamedTuple):
    """Result of `chunked_logprobs`.

    Shape:
        logprobs: `[B, T]`, float32 (float64 for float64 inputs); 0 where the mask is 0.
        entropy: `[B, T]` like `logprobs`, or `None` unless asked for.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def chunked_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
    entropy_grad: bool = False,
) -> TokenLogProbs:
    """Log-probability of each target token under `softmax(lm_head(hidden) / temperature)`, and optionally the
    entropy of that distribution, without materialising the `[B, T, V]` logits.

    Equals `selective_log_softmax(lm_head(hidden).float() / temperature, targets)` (and `entropy_from_logits` of the
    same logits), gradients included, up to float rounding. The projection runs in the matmul dtype the model would
    use (the dtype of `hidden` and the weight, or the autocast dtype inside `torch.autocast`); the softmax in float32.

    `lm_head` is an `nn.Linear` (bias allowed) or its weight tensor `[V, H]`: then a custom autograd function does
    the work, and in backward accumulates the weight's gradient in float32 when the weight requires grad (a trainable
    or tied lm_head). Any other module (a PEFT LoRA or 4-bit lm_head) is called on each chunk under activation
    checkpointing: the same numbers and the same one-chunk peak, with a few more chunk-sized temporaries.

    Args:
        hidden: Shape: `[B, T, H]` (any leading dims matching `targets`), any float dtype; the hidden state that
            predicts `targets` at the same position (already shifted by the caller).
        lm_head: `nn.Linear(H, V)`, a weight tensor of Shape: `[V, H]`, or another module mapping `H -> V`.
        targets: Shape: `[B, T]`, int64 token ids; values under `mask == 0` are never read (padding may hold -100).
        temperature: logits are divided by it before the softmax, as the sampler did; must be positive.
        mask: Shape: `[B, T]`, bool or 0/1, or `None` (every position counts). Masked positions are skipped (no
            projection, no gradient) and give 0 log-prob and 0 entropy.
        chunk_size: tokens per chunk along the flattened valid positions; one `[chunk_size, V]` float32 block is the
            working set. Larger is faster (bigger matmuls), smaller saves memory.
        return_entropy: also return the entropy of each position's distribution.
        entropy_grad: let gradients flow from the entropy (an entropy bonus in the loss); otherwise the entropy is a
            detached statistic and no graph is kept for it.

    Returns:
        `TokenLogProbs(logprobs, entropy)`, each Shape: `targets.shape`.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"`hidden` [..., H] and `targets` [...] must share leading dims; got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}."
        )
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"`mask` must have the shape of `targets` {tuple(targets.shape)}, got {tuple(mask.shape)}.")

    h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    t = targets.reshape(-1).long()
    rows = None
    if mask is not None:
        # Compacting the valid rows skips the padding's projections and keeps its targets unread.
        rows = mask.reshape(-1).nonzero().squeeze(1)
        h, t = h.index_select(0, rows), t.index_select(0, rows)

    weight, bias = _linear_parts(lm_head)
    if weight is None:
        logprobs, entropy = _module_logprobs(lm_head, h, t, temperature, chunk_size, return_entropy, entropy_grad)
    else:
        if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
            raise ValueError(f"lm_head weight must be [V, H={h.shape[1]}], got {tuple(weight.shape)}.")
        matmul_dtype = _matmul_dtype(h, weight)
        logprobs, entropy = _ChunkedLinearLogProbs.apply(
            h, weight, bias, t, temperature, chunk_size, matmul_dtype, return_entropy, entropy_grad
        )
    if not return_entropy:
        entropy = None

    if rows is not None:
        logprobs = _scatter_rows(logprobs, rows, targets.numel())
        entropy = None if entropy is None else _scatter_rows(entropy, rows, targets.numel())
    logprobs = logprobs.reshape(targets.shape)
    return TokenLogProbs(logprobs, None if entropy is None else entropy.reshape(targets.shape))


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _linear_parts(lm_head: nn.Module | torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(weight, bias)` when `lm_head` computes exactly `F.linear(x, weight, bias)`, else `(None, None)`.

    bitsandbytes' `Linear4bit` subclasses `nn.Linear` but packs its weight and overrides `forward`, so only a module
    whose class keeps `nn.Linear.forward` (and a float weight) is taken apart; everything else is called as is.
    """
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    if (
        isinstance(lm_head, nn.Linear)
        and type(lm_head).forward is nn.Linear.forward
        and lm_head.weight.is_floating_point()
    ):
        return lm_head.weight, lm_head.bias
    return None, None


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would multiply in: the autocast dtype inside `torch.autocast`, else the inputs' dtype.

    Deciding it once makes backward rebuild exactly the forward's logits even when backward runs outside the
    autocast region (the chunk loop itself runs with autocast off and casts explicitly).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"`hidden` is {hidden.dtype} but the lm_head weight is {weight.dtype}; cast one of them (nn.Linear would "
            "fail the same way) or run under torch.autocast."
        )
    return hidden.dtype


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Put `values` [n_valid] back at `rows` of a zero tensor [n] (differentiable w.r.t. `values`)."""
    return values.new_zeros(n).index_copy(0, rows, values)


def _scaled_logits(h, weight, bias, temperature, softmax_dtype) -> torch.Tensor:
    """`F.linear(h, weight, bias).to(softmax_dtype) / temperature` for one chunk, as a fresh tensor we may overwrite.

    Shape: h `[c, H]`, weight `[V, H]`, bias `[V]` or None, all in the matmul dtype -> `[c, V]`.
    """
    # For half-precision logits the cast is a copy and the matmul-dtype logits die on return.
    return F.linear(h, weight, bias).to(softmax_dtype).div_(temperature)


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """Log-probs (and entropies) of `targets` under `softmax(F.linear(hidden, weight, bias) / temperature)`,
    one chunk of rows at a time in forward and in backward.

    Shape:
        hidden: `[N, H]`; weight: `[V, H]`; bias: `[V]` or None; targets: `[N]` int64.
        returns logprobs `[N]` and entropy `[N]` (empty `[0]` when not asked for), float32 or float64.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, matmul_dtype, with_entropy, entropy_grad):
        softmax_dtype = torch.promote_types(matmul_dtype, torch.float32)
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=softmax_dtype)
        lse = hidden.new_empty(n, dtype=softmax_dtype)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=softmax_dtype)
        w = weight.to(matmul_dtype)
        b = None if bias is None else bias.to(matmul_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                z = _scaled_logits(hidden[rows].to(matmul_dtype), w, b, temperature, softmax_dtype)  # [c, V]
                lse[rows] = torch.logsumexp(z, dim=-1)
                logprobs[rows] = z.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
                if with_entropy:
                    logp = z.sub_(lse[rows, None])
                    entropy[rows] = -(logp.exp().mul_(logp)).sum(-1)
                del z

        entropy_grad = with_entropy and entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if entropy_grad else None)
        ctx.config = (temperature, chunk_size, matmul_dtype, softmax_dtype)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, matmul_dtype, softmax_dtype = ctx.config
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if entropy is None:
            grad_entropy = None
        if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
            return (None,) * 9

        w = weight.to(matmul_dtype)
        b = None if bias is None else bias.to(matmul_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Summing many chunks' weight gradients in bf16 would round at every step: accumulate in float32 at least.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(matmul_dtype)
                z = _scaled_logits(h, w, b, temperature, softmax_dtype)  # [c, V]
                grad_z = _grad_scaled_logits(
                    z,
                    lse[rows],
                    targets[rows],
                    None if grad_logprobs is None else grad_logprobs[rows],
                    None if grad_entropy is None else grad_entropy[rows],
                    None if entropy is None else entropy[rows],
                )
                del z
                # d logits = d z / temperature, in the matmul dtype as autograd's `.float()` backward would cast it.
                grad_logits = grad_z.div_(temperature).to(matmul_dtype)
                del grad_z
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if need_weight:
                    if acc_dtype == matmul_dtype:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:
                        grad_weight.add_(grad_logits.T @ h)
                if need_bias:
                    grad_bias.add_(grad_logits.sum(0))
                del grad_logits
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _grad_scaled_logits(z, lse, targets, grad_logprobs, grad_entropy, entropy) -> torch.Tensor:
    """Gradient w.r.t. the scaled logits `z` of `sum(g * log p_y) + sum(g_H * entropy)` for one chunk, in place.

    `d log p_y / dz = onehot(y) - p` and `d entropy / dz = -p * (log p + entropy)` (module docstring).

    Shape: z `[c, V]` (overwritten and returned); lse, targets, grad_logprobs, grad_entropy, entropy `[c]`
    (either gradient may be None: no contribution).
    """
    logp = z.sub_(lse[:, None])
    p = logp.exp()
    if grad_entropy is not None:
        grad_z = logp.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        if grad_logprobs is not None:
            grad_z.sub_(p.mul_(grad_logprobs[:, None]))
    else:
        grad_z = p.mul_(-grad_logprobs[:, None])
    if grad_logprobs is not None:
        grad_z.scatter_add_(1, targets[:, None], grad_logprobs[:, None].to(grad_z.dtype))
    return grad_z


def _module_logprobs(head, hidden, targets, temperature, chunk_size, with_entropy, entropy_grad):
    """Fallback for an lm_head that is not a plain linear layer: call it per chunk under non-reentrant activation
    checkpointing, so forward keeps only each chunk's input and backward rebuilds one chunk's logits at a time.

    Shape: hidden `[N, H]`, targets `[N]` -> logprobs `[N]`, entropy `[N]` or None.
    """
    checkpointed = torch.is_grad_enabled()
    logprobs, entropies = [], []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        args = (head, h, t, temperature, with_entropy, entropy_grad)
        logp, entropy = checkpoint(_module_chunk, *args, use_reentrant=False) if checkpointed else _module_chunk(*args)
        logprobs.append(logp)
        entropies.append(entropy)
    if not logprobs:  # every position masked
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, empty if with_entropy else None
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


def _module_chunk(head, h, targets, temperature, with_entropy, entropy_grad):
    """One chunk of `_module_logprobs`, written as the unchunked path (module -> float -> / T -> log-softmax)."""
    logits = head(h)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            log_softmax = z - lse[:, None]
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return logp, entropy
