"""Pure tensor maths for PPO with generalized advantage estimation: masked statistics, whitening, GAE, KL
estimators and the clipped policy / value losses.

Nothing here knows about a trainer, a model or a config: every function takes tensors and numbers and returns
tensors, so each can be tested against its formula (see `docs/gae.md` for the maths in one notation).

Notation (token-level MDP, one row per sampled response):
    B           batch size (number of responses)
    T           padded response length; position t is the t-th response token
    mask        [B, T], 1 on response tokens, 0 on padding; right-padded (each row: ones, then zeros)
    r_t         per-token reward (sequence score on the last response token, -beta * KL_t on every token)
    V_t         critic value V(s_t) of the state before token t
    delta_t     TD residual r_t + gamma * V_{t+1} - V_t
    A_t         advantage, G_t = A_t + V_t the critic target ("return")
    rho_t       probability ratio pi(y_t | s_t) / pi_old(y_t | s_t) = exp(logp_t - old_logp_t)

Sources: GAE, Schulman et al. 2016 (arXiv:1506.02438); PPO, Schulman et al. 2017 (arXiv:1707.06347); the
implementation details follow TRL 1.12 `trl/experimental/ppo/ppo_trainer.py` and cleanrl `ppo.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean")

# verl's `compute_policy_loss` clamps the log-ratio to [-20, 20] before `exp` for the same reason: a stale or
# corrupted log-probability must not turn the loss or its gradient into inf/nan. exp(20) ~ 4.9e8 is far outside
# any clip range, so the clamp never changes a loss that is not already degenerate.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is non-zero (a float mask acts as weights).

    Entries under a zero mask are ignored even when they are nan/inf. An empty selection gives nan.

    Args:
        values: Shape: any, e.g. `[B, T]`.
        mask: Shape: same as `values` (or broadcastable to it); bool, int or float.
        dim: dimension to reduce; `None` reduces everything to a scalar.
    """
    mask = torch.broadcast_to(mask.to(values.dtype), values.shape)
    weighted = torch.where(mask != 0, values, torch.zeros((), dtype=values.dtype, device=values.device)) * mask
    if dim is None:
        return weighted.sum() / mask.sum()
    return weighted.sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the entries where `mask` is non-zero, as a scalar.

    With `unbiased=True` the Bessel correction n / (n - 1) is applied (as TRL 1.12 did), which needs at least two
    valid entries; fewer raise a ValueError instead of silently returning inf/nan.

    Args:
        values: Shape: any, e.g. `[B, T]`.
        mask: Shape: same as `values` (or broadcastable to it); bool, int or float.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 valid entries, got {float(n):g}; use a larger (mini-)batch "
                "or pass precomputed `mean`/`var` to `masked_whiten`."
            )
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: torch.Tensor | float | None = None,
    var: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Whiten `values` over the valid entries: `(x - mean) / sqrt(var + eps)`, adding the mean back when
    `shift_mean=False` (TRL whitens rewards that way, so their sign survives). Output is 0 where `mask` is 0.

    `mean` / `var` are optional precomputed statistics, e.g. all-reduced over processes so every rank whitens
    with the same global numbers; when omitted they are `masked_mean` / unbiased `masked_var` of this tensor.

    Args:
        values: Shape: any, e.g. `[B, T]`.
        mask: Shape: same as `values`; bool, int or float (non-zero = valid).
        mean: Shape: scalar (tensor or float), or `None`.
        var: Shape: scalar (tensor or float), or `None`.

    Returns:
        Shape: same as `values`, same dtype (computed in float32 for half-precision inputs).
    """
    x = values.to(_compute_dtype(values))
    if mean is None:
        mean = masked_mean(x, mask)
    if var is None:
        var = masked_var(x, mask, unbiased=True)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    whitened = torch.where(mask != 0, whitened, torch.zeros((), dtype=x.dtype, device=x.device))
    return whitened.to(values.dtype)


# --------------------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# --------------------------------------------------------------------------------------------------------------


def _reverse_discounted_cumsum(x: torch.Tensor, discount: float | torch.Tensor) -> torch.Tensor:
    """`y_t = sum_{l >= 0} discount^l * x_{t+l}` along the last dim, i.e. `y_t = x_t + discount * y_{t+1}`.

    A reverse loop over t costs T tiny kernel launches. This is the recursive-doubling scan for a first-order
    linear recurrence (Hillis & Steele 1986; Kogge & Stone 1973): after the step with shift s, `y_t` holds
    `sum_{l < 2s} discount^l x_{t+l}`, because `y_t + discount^s * y_{t+s}` appends the next s terms. It takes
    ceil(log2 T) steps of two whole-batch kernels each (20 for T = 1024). Only non-negative powers of a discount in
    [0, 1] appear, so nothing overflows and small powers underflow to 0, their exact limit (the closed form
    `cumsum(discount^-t * x)` overflows for small discounts). Each result goes through ceil(log2 T) additions, not
    up to T as in the loop, so rounding errors stay at the level of a few ulps.

    Args:
        x: Shape: `[B, T]`, float32 or float64.
        discount: a float, or Shape: `[B]` (one discount per row), in [0, 1].
    """
    T = x.shape[-1]
    per_row = isinstance(discount, torch.Tensor)
    if per_row:
        discount = discount.to(device=x.device, dtype=torch.float64)[:, None]  # [B, 1]
    y = x.clone()
    shift = 1
    while shift < T:
        # Powers in float64, rounded once to the compute dtype.
        factor = (discount**shift).to(x.dtype) if per_row else float(discount) ** shift
        y[:, : T - shift].add_(y[:, shift:] * factor)  # the product is a new tensor, so the overlap is safe
        shift *= 2
    return y


def _as_lambda(lam: float | torch.Tensor, batch_size: int, name: str) -> float | torch.Tensor:
    """Validate a lambda given as a float or a `[B]` tensor; returns a float or a float64 `[B]` tensor."""
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            lam = float(lam)
        else:
            if lam.shape != (batch_size,):
                raise ValueError(
                    f"`{name}` must be a float or a tensor of shape [B]=[{batch_size}], got {tuple(lam.shape)}."
                )
            lam = lam.detach().to(torch.float64)
            if bool(((lam < 0) | (lam > 1) | lam.isnan()).any()):
                raise ValueError(f"`{name}` must lie in [0, 1], got values outside it: {lam.tolist()}.")
            return lam
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {lam}.")
    return float(lam)


def _td_residuals(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    last_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate inputs and compute `delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)` on valid tokens (0 elsewhere).

    V(s_{t+1}) after the last valid token is `last_values` (a truncated row, bootstrapped) or 0 (a finished row),
    as in cleanrl's `nextnonterminal` handling; padding never leaks in, even when it holds nan.

    Returns `(delta, values, valid)` with `delta`/`values` detached in the compute dtype and `valid` boolean.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            "`rewards`, `values` and `mask` must all have shape [B, T]; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}."
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"`gamma` must lie in [0, 1], got {gamma}.")
    valid = mask != 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("`mask` must be right-padded: in every row, ones then zeros (no valid token after padding).")
    dtype = _compute_dtype(rewards, values)
    # GAE targets are constants for the losses (cleanrl/TRL compute them under no_grad): detach.
    rewards = rewards.detach().to(dtype)
    values = values.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)

    next_valid = F.pad(valid[:, 1:], (0, 1), value=False)
    next_values = torch.where(next_valid, F.pad(values[:, 1:], (0, 1)), zero)
    if last_values is not None:
        if last_values.shape != (values.shape[0],):
            raise ValueError(f"`last_values` must have shape [B]=[{values.shape[0]}], got {tuple(last_values.shape)}.")
        is_last = valid & ~next_valid
        next_values = torch.where(is_last, last_values.detach().to(dtype)[:, None], next_values)
    delta = torch.where(valid, rewards + gamma * next_values - values, zero)
    return delta, values, valid


def _finish(
    advantages: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    advantages = torch.where(valid, advantages, zero)
    returns = torch.where(valid, advantages + values, zero)
    return advantages.to(out_dtype), returns.to(out_dtype)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float | torch.Tensor,
    last_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16) on padded token rows.

    `A_t = sum_{l=0}^{L-t-1} (gamma * lam)^l * delta_{t+l}` over the row's L valid tokens, with
    `delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`; after the last valid token V is `last_values` (a row cut at the
    length limit) or 0 (a finished row). `lam=0` gives TD(0) (`A = delta`), `lam=1` the Monte Carlo return minus V.
    No whitening happens here (see `masked_whiten`).

    Args:
        rewards: Shape: `[B, T]`. Per-token rewards; ignored where `mask` is 0.
        values: Shape: `[B, T]`. V(s_t); ignored where `mask` is 0. Treated as a constant (detached).
        mask: Shape: `[B, T]`. 1 on response tokens, right-padded; a row may be all zeros.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1], a float or Shape: `[B]` (one lambda per row, e.g. `adaptive_lambda`).
        last_values: Shape: `[B]`, optional bootstrap V(s_T) for truncated rows (rows not truncated should pass 0).

    Returns:
        `(advantages, returns)`, both Shape: `[B, T]` in the input dtype (computed in float32, or float64 for
        float64 inputs), exactly 0 where `mask` is 0, `returns = advantages + values` where `mask` is 1.
    """
    lam = _as_lambda(lam, rewards.shape[0], "lam")
    out_dtype = torch.promote_types(rewards.dtype, values.dtype)
    delta, values, valid = _td_residuals(rewards, values, mask, gamma, last_values)
    advantages = _reverse_discounted_cumsum(delta, gamma * lam)
    return _finish(advantages, values, valid, out_dtype)


def compute_decoupled_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam_actor: float | torch.Tensor,
    lam_critic: float | torch.Tensor,
    last_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with separate lambdas for the actor and the critic (decoupled GAE).

    VC-PPO (Yuan et al. 2025, arXiv:2503.01491) and VAPO (arXiv:2504.05118) train the critic on `lam_critic=1`
    targets, which carry the end-of-sequence reward to early tokens undecayed, while the policy uses a smaller
    `lam_actor` for lower variance. Advantages are `compute_gae(..., lam_actor)[0]`, returns
    `compute_gae(..., lam_critic)[1]`; the TD residuals are computed once.

    Args:
        rewards: Shape: `[B, T]`.
        values: Shape: `[B, T]`.
        mask: Shape: `[B, T]`. 1 on response tokens, right-padded.
        gamma: discount in [0, 1].
        lam_actor: float or Shape: `[B]`; lambda for the advantages.
        lam_critic: float or Shape: `[B]`; lambda for the returns (critic targets).
        last_values: Shape: `[B]`, optional bootstrap for truncated rows.

    Returns:
        `(advantages, returns)`, both Shape: `[B, T]`, as in `compute_gae`.
    """
    lam_actor = _as_lambda(lam_actor, rewards.shape[0], "lam_actor")
    lam_critic = _as_lambda(lam_critic, rewards.shape[0], "lam_critic")
    out_dtype = torch.promote_types(rewards.dtype, values.dtype)
    delta, values, valid = _td_residuals(rewards, values, mask, gamma, last_values)
    actor_advantages = _reverse_discounted_cumsum(delta, gamma * lam_actor)
    same = not isinstance(lam_actor, torch.Tensor) and not isinstance(lam_critic, torch.Tensor)
    if same and lam_actor == lam_critic:
        critic_advantages = actor_advantages
    else:
        critic_advantages = _reverse_discounted_cumsum(delta, gamma * lam_critic)
    advantages, _ = _finish(actor_advantages, values, valid, out_dtype)
    _, returns = _finish(critic_advantages, values, valid, out_dtype)
    return advantages, returns


def adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """Length-adaptive GAE lambda of VAPO (arXiv:2504.05118, eq. 7): `lambda = 1 - 1 / (alpha * length)`.

    The effective horizon `1 / (1 - lambda) = alpha * length` grows with the response, so long responses still
    propagate the final reward back to their early tokens. Clamped to [0, 1]; a length of 0 gives 0.

    Args:
        lengths: Shape: `[B]`, number of response tokens per row (int or float).
        alpha: positive coefficient (VAPO uses 0.05).

    Returns:
        Shape: `[B]`, float32 (float64 for float64 `lengths`).
    """
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha}.")
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    lengths = lengths.to(dtype)
    safe = lengths.clamp(min=torch.finfo(dtype).tiny)
    lam = (1.0 - 1.0 / (alpha * safe)).clamp(0.0, 1.0)
    return torch.where(lengths > 0, lam, torch.zeros_like(lam))


# --------------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi.

    With `log r = ref_logp - logp` (John Schulman, "Approximating KL divergence", 2020,
    http://joschu.net/blog/kl-approx.html):
        k1 = -log r                  unbiased, can be negative per token
        k2 = 0.5 * (log r)^2         biased, low variance
        k3 = (r - 1) - log r         unbiased and always >= 0

    Args:
        logprobs: Shape: `[B, T]`, log pi(y_t | s_t).
        ref_logprobs: Shape: `[B, T]`, log pi_ref(y_t | s_t).
        estimator: one of `KL_ESTIMATORS`.

    Returns:
        Shape: `[B, T]`, float32 (float64 for float64 inputs); padding positions are not masked.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}; valid estimators are {', '.join(KL_ESTIMATORS)}.")
    dtype = _compute_dtype(logprobs, ref_logprobs)
    log_ratio = ref_logprobs.to(dtype) - logprobs.to(dtype)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    # expm1 avoids the cancellation of exp(x) - 1 near x = 0; the clamp removes rounding below the true bound 0.
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    """Clipped-surrogate loss and its statistics (all detached except `loss`)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_var: torch.Tensor


class ValueLossOutput(NamedTuple):
    """Clipped value loss and the fraction of valid tokens where the clipped error was the larger."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {', '.join(choices)}.")


def _safe_mean(x: torch.Tensor, weights: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Weighted mean that is 0 (not nan) over an empty selection, so an all-padding micro-batch gives a zero loss
    with a zero gradient instead of poisoning the update. `x` must already be finite where `weights` is 0."""
    if dim is None:
        return (x * weights).sum() / weights.sum().clamp(min=1.0)
    return (x * weights).sum(dim) / weights.sum(dim).clamp(min=1.0)


def _normalised_sum(x: torch.Tensor, weights: torch.Tensor, count: float | None) -> torch.Tensor:
    """`sum(x * weights) / count`; `count` defaults to `weights.sum()` (0 for an empty selection, not nan)."""
    if count is None:
        return _safe_mean(x, weights)
    if not count > 0:
        raise ValueError(f"A loss normaliser must be > 0, got {count}.")
    return (x * weights).sum() / count


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_aggregation: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar over the valid tokens of a ragged batch.

    - `token_mean`: sum over valid tokens / `num_tokens` (every token weighs the same, long rows weigh more; TRL
      1.12, DAPO arXiv:2503.14476 sec. 3.3).
    - `seq_mean`: each row's mean over its valid tokens, summed over rows / `num_seqs` (every response weighs the same).

    `num_tokens` / `num_seqs` default to this batch's own counts (valid tokens; rows with at least one valid token),
    which makes the result the plain mean. When the batch is one micro-batch of a minibatch trained with gradient
    accumulation, pass the **minibatch's** counts: the micro-batch losses then add up to the minibatch's mean, so the
    accumulated gradient does not depend on how the minibatch is split (normalising each micro-batch by its own count
    weighs a token by the inverse of its micro-batch's length). An empty batch gives 0, not nan.

    Args:
        per_token: Shape: `[B, T]`; entries under a zero mask are ignored even when nan/inf.
        mask: Shape: `[B, T]`, non-zero on valid tokens.
        loss_aggregation: one of `LOSS_AGGREGATIONS`.
        num_tokens: normaliser of `token_mean` (> 0), or None for this batch's valid-token count.
        num_seqs: normaliser of `seq_mean` (> 0), or None for this batch's count of non-empty rows.

    Returns:
        Scalar, differentiable where `per_token` is.
    """
    _check_choice(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")
    valid = mask != 0
    per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    weights = valid.to(per_token.dtype)
    if loss_aggregation == "token_mean":
        return _normalised_sum(per_token, weights, num_tokens)
    row_loss = _safe_mean(per_token, weights, dim=-1)
    return _normalised_sum(row_loss, (weights.sum(-1) > 0).to(per_token.dtype), num_seqs)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, cliprange: float, dual_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element PPO loss `max(-A * rho, -A * clip(rho, 1-eps, 1+eps))` (Schulman et al. 2017, eq. 7, negated),
    bounded by `-c * A` for A < 0 with dual clip (Ye et al. 2020, arXiv:1912.09729, eq. 5). Returns the loss and a
    bool tensor telling where the clipped term was the active one."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss, clipped > unclipped


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    loss_aggregation: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped-surrogate policy loss, token-level (default) or sequence-level (GSPO).

    - `ratio_level="token"`: `rho_t = exp(logp_t - old_logp_t)`, per-token loss
      `max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps))`, aggregated by `loss_aggregation`.
    - `ratio_level="sequence"` (GSPO, Zheng et al. 2025, arXiv:2507.18071): one length-normalised ratio per row,
      `s = exp(mean_t(logp_t - old_logp_t))` (the geometric mean of the token ratios), one advantage per row, and
      the same clipped loss per row, summed over rows with at least one valid token / `num_seqs`
      (`loss_aggregation` does not apply). This is the sequence-level form `A(x, y) = R - V(x)` of the design notes.
    - `dual_clip=c` (c > 1, Ye et al. 2020): for A < 0 the loss is additionally bounded by `-c * A`, so a huge
      ratio on a negative-advantage token cannot dominate the update.

    The log-ratio is clamped to +-20 before `exp` (as verl does) so the loss and gradients stay finite.

    Args:
        logprobs: Shape: `[B, T]`, log-probabilities under the current policy (differentiable).
        old_logprobs: Shape: `[B, T]`, log-probabilities under the rollout policy.
        advantages: Shape: `[B, T]` for token level (a `[B]` tensor is broadcast over tokens); `[B]` for sequence
            level, where a `[B, T]` tensor is also accepted and each row's first-token advantage is used.
        mask: Shape: `[B, T]`, non-zero on valid response tokens.
        cliprange: epsilon > 0.
        dual_clip: None, or the constant c > 1.
        ratio_level: one of `RATIO_LEVELS`.
        loss_aggregation: one of `LOSS_AGGREGATIONS`.
        num_tokens, num_seqs: normalisers of the loss, see `aggregate_loss` (None: this batch's own counts, the
            plain mean; a micro-batch passes its minibatch's counts). The statistics are always this batch's means.

    Returns:
        `PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean, ratio_var)`; `loss` is a differentiable scalar,
        the others detached scalars: `clipfrac` the fraction of valid tokens (rows, at sequence level) where the
        clipped term was active, `approx_kl` the masked mean of `0.5 * (logp - old_logp)^2`, `ratio_mean` /
        `ratio_var` the mean / population variance of the ratio over valid tokens (rows).
    """
    _check_choice(ratio_level, RATIO_LEVELS, "ratio_level")
    _check_choice(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")
    if not cliprange > 0:
        raise ValueError(f"`cliprange` must be > 0, got {cliprange}.")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"`dual_clip` must be None or a constant > 1, got {dual_clip}.")
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "`logprobs`, `old_logprobs` and `mask` must all have shape [B, T]; got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}."
        )
    B, T = logprobs.shape
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(
            f"`advantages` must have shape [B, T]=[{B}, {T}] or [B]=[{B}], got {tuple(advantages.shape)}."
        )

    dtype = _compute_dtype(logprobs, old_logprobs, advantages)
    valid = mask != 0
    weights = valid.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Padding may hold sentinels (TRL's INVALID_LOGPROB) or -inf: select, never multiply, so no nan leaks in.
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    advantages = advantages.detach().to(dtype)

    if ratio_level == "token":
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand(B, T)
        advantages = torch.where(valid, advantages, zero)
        ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        per_token, was_clipped = _clipped_surrogate(ratio, advantages, cliprange, dual_clip)
        loss = aggregate_loss(per_token, valid, loss_aggregation, num_tokens, num_seqs)
        stat_weights = weights
    else:
        if advantages.dim() == 2:
            advantages = advantages[:, 0]
        stat_weights = (valid.sum(-1) > 0).to(dtype)  # rows with at least one valid token
        seq_log_ratio = _safe_mean(log_ratio, weights, dim=-1)
        ratio = torch.exp(seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        advantages = torch.where(stat_weights > 0, advantages, zero)
        per_row, was_clipped = _clipped_surrogate(ratio, advantages, cliprange, dual_clip)
        loss = _normalised_sum(per_row, stat_weights, num_seqs)

    with torch.no_grad():
        clipfrac = _safe_mean(was_clipped.to(dtype), stat_weights)
        approx_kl = _safe_mean(0.5 * log_ratio.detach() ** 2, weights)
        ratio = ratio.detach()
        ratio_mean = _safe_mean(ratio, stat_weights)
        ratio_var = _safe_mean((ratio - ratio_mean) ** 2, stat_weights)
    return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean, ratio_var)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = None,
    loss_aggregation: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> ValueLossOutput:
    """Clipped value loss `0.5 * agg(max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2))`.

    The pessimistic max over the clipped and unclipped errors follows OpenAI baselines / TRL 1.12 (Engstrom et al.
    2020, arXiv:2005.12729, discuss it as an implementation detail). With `cliprange_value` None or <= 0 it is
    the plain `0.5 * agg((V - G)^2)` and `clipfrac` is 0.

    Args:
        values: Shape: `[B, T]`, current critic predictions (differentiable).
        old_values: Shape: `[B, T]`, predictions at rollout time.
        returns: Shape: `[B, T]`, critic targets G (e.g. from `compute_gae`).
        mask: Shape: `[B, T]`, non-zero on valid tokens.
        cliprange_value: clip range c of the value prediction around `old_values`.
        loss_aggregation: one of `LOSS_AGGREGATIONS` (see `aggregate_loss`).
        num_tokens, num_seqs: normalisers of the loss, see `aggregate_loss` (None: this batch's own counts).

    Returns:
        `ValueLossOutput(loss, clipfrac)`: differentiable scalar loss, detached scalar clip fraction.
    """
    _check_choice(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")
    if not (values.shape == old_values.shape == returns.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            "`values`, `old_values`, `returns` and `mask` must all have shape [B, T]; got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}."
        )
    dtype = _compute_dtype(values, old_values, returns)
    valid = mask != 0
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(valid, values.to(dtype), zero)
    old = torch.where(valid, old_values.detach().to(dtype), zero)
    target = torch.where(valid, returns.detach().to(dtype), zero)

    error = (v - target) ** 2
    if cliprange_value is None or cliprange_value <= 0:
        per_token = error
        was_clipped = torch.zeros_like(valid)
    else:
        v_clipped = old + torch.clamp(v - old, -cliprange_value, cliprange_value)
        error_clipped = (v_clipped - target) ** 2
        per_token = torch.maximum(error, error_clipped)
        was_clipped = error_clipped > error
    loss = 0.5 * aggregate_loss(per_token, valid, loss_aggregation, num_tokens, num_seqs)
    with torch.no_grad():
        clipfrac = _safe_mean(was_clipped.to(dtype), valid.to(dtype))
    return ValueLossOutput(loss, clipfrac)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`1 - Var[G - V] / Var[G]` over valid tokens: 1 for a perfect critic, 0 for one that predicts the mean,
    negative for one worse than that; nan when `Var[G]` is 0 (undefined).

    `Var[G]` counts as 0 when the spread of G is within rounding error: returns that are equal in exact arithmetic
    (one score for every response and no KL gives `G_t = R` everywhere) come out of GAE a few ulps apart, and
    dividing by that variance would give values like -3e14. GAE builds G in up to T steps from quantities the size
    of G and V, so a standard deviation below `T * eps * max|G, V|` (eps of the compute dtype) is taken as 0.

    Args:
        values: Shape: `[B, T]`, critic predictions V.
        returns: Shape: `[B, T]`, targets G.
        mask: Shape: `[B, T]`, non-zero on valid tokens.

    Returns:
        Detached scalar, float32 (float64 for float64 inputs).
    """
    dtype = _compute_dtype(values, returns)
    values = values.detach().to(dtype)
    returns = returns.detach().to(dtype)
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    scale = torch.where(mask != 0, torch.maximum(returns.abs(), values.abs()), 0.0).amax()
    rounding = returns.shape[-1] * torch.finfo(dtype).eps * scale
    nan = torch.full((), float("nan"), dtype=dtype, device=values.device)
    return torch.where(var_returns > rounding**2, 1.0 - var_residual / var_returns, nan)
