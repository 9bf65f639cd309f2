"""`compute_gae`, `compute_decoupled_gae` and `adaptive_lambda` against a closed-form sum, a cleanrl-style loop and
hand-computed numbers."""

import math

import pytest
import torch

from trl_gae_ext.gae import adaptive_lambda, compute_decoupled_gae, compute_gae


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------


def ragged_batch(T, lengths, seed=0, dtype=torch.float64):
    """Random rewards/values with right padding; padding holds garbage (nan) that must never leak in."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    rewards = rewards.masked_fill(~mask, float("nan"))
    values = values.masked_fill(~mask, float("nan"))
    return rewards, values, mask.long()


def closed_form_gae(rewards, values, mask, gamma, lam, last_values=None):
    """A_t = sum_{l=0}^{L-t-1} (gamma*lam)^l delta_{t+l}, one row and one token at a time, in Python floats."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        lam_b = float(lam[b]) if isinstance(lam, torch.Tensor) else lam
        bootstrap = float(last_values[b]) if last_values is not None else 0.0
        r = rewards[b].tolist()
        v = values[b].tolist()
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else bootstrap) - v[t] for t in range(L)]
        for t in range(L):
            advantages[b, t] = sum((gamma * lam_b) ** k * delta[t + k] for k in range(L - t))
    returns = torch.where(mask.bool(), advantages + torch.nan_to_num(values.double()), 0.0)
    return advantages, returns


def cleanrl_gae(rewards, values, mask, gamma, lam, last_values=None):
    """Reverse-time loop in cleanrl's style (`nextnonterminal`), vectorised over B, in float64."""
    B, T = rewards.shape
    valid = mask.bool()
    rewards = torch.nan_to_num(rewards.double())
    values = torch.nan_to_num(values.double())
    bootstrap = last_values.double() if last_values is not None else torch.zeros(B, dtype=torch.float64)
    lam = lam.double() if isinstance(lam, torch.Tensor) else lam
    advantages = torch.zeros(B, T, dtype=torch.float64)
    lastgaelam = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        nextnonterminal = valid[:, t + 1].double() if t + 1 < T else torch.zeros(B, dtype=torch.float64)
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=torch.float64)
        nextvalues = nextnonterminal * nextvalues + (1 - nextnonterminal) * bootstrap
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = torch.where(valid[:, t], lastgaelam, 0.0)
    return advantages


# Lengths always include an empty row, a one-token row and a full row.
def lengths_for(T):
    return [0, 1, T, max(T - 1, 0), T // 2, 2 if T > 2 else T]


# gamma, lam: the boundaries 0 and 1 of both, and usual settings.
GAMMA_LAMBDA = [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.0, 0.7), (0.5, 1.0), (1.0, 0.0), (0.0, 0.0)]
# 1: no doubling step; 7: three steps, T not a power of two; 130: eight steps, the last one shifting past T/2.
LENGTHS = [1, 7, 130]


# --------------------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAMBDA)
def test_matches_closed_form(gamma, lam, T):
    rewards, values, mask = ragged_batch(T, lengths_for(T), seed=T)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = closed_form_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAMBDA)
def test_float32_matches_float64_reference(gamma, lam, T):
    rewards, values, mask = ragged_batch(T, lengths_for(T), seed=T + 1)
    advantages, _ = compute_gae(rewards.float(), values.float(), mask, gamma, lam)
    assert advantages.dtype == torch.float32
    expected = cleanrl_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("T", LENGTHS)
def test_per_row_lambda_and_bootstrap_match_references(T):
    lengths = lengths_for(T)
    rewards, values, mask = ragged_batch(T, lengths, seed=2 * T)
    lam = torch.tensor([0.3, 0.0, 1.0, 0.95, 0.5, 0.8])  # includes both ends of [0, 1]
    last_values = torch.linspace(-2.0, 3.0, len(lengths), dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, mask, 0.97, lam, last_values=last_values)
    expected, expected_returns = closed_form_gae(rewards, values, mask, 0.97, lam, last_values)
    torch.testing.assert_close(advantages, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(advantages, cleanrl_gae(rewards, values, mask, 0.97, lam, last_values))


def test_per_row_lambda_equals_scalar_lambda_row_by_row():
    rewards, values, mask = ragged_batch(100, [100, 37, 0, 64], seed=3)
    lam = torch.tensor([0.9, 0.2, 0.5, 1.0])
    advantages, _ = compute_gae(rewards, values, mask, 0.99, lam)
    for b in range(4):
        row, _ = compute_gae(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1], 0.99, float(lam[b]))
        torch.testing.assert_close(advantages[b : b + 1], row)


def test_long_sequences_small_and_large_discounts_stay_exact():
    # (gamma*lam)^-t tricks overflow here (0.05^-4000); the blockwise product only forms non-negative powers.
    rewards, values, mask = ragged_batch(4000, [4000, 3999, 1234, 0], seed=4, dtype=torch.float32)
    for gamma, lam in [(0.1, 0.5), (1.0, 0.999), (1.0, 1.0)]:
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        expected = cleanrl_gae(rewards, values, mask, gamma, lam)
        assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
        # Monte Carlo sums over 4000 unit-variance rewards reach ~60 in magnitude: compare relative to that.
        scale = expected.abs().max().item()
        assert (advantages.double() - expected).abs().max().item() <= 1e-5 * max(scale, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------


def test_lambda_zero_is_td_residual():
    rewards, values, mask = ragged_batch(20, [20, 5, 1, 0], seed=5)
    advantages, _ = compute_gae(rewards, values, mask, 0.9, 0.0)
    valid = mask.bool()
    next_values = torch.where(valid[:, 1:], values[:, 1:], 0.0)
    next_values = torch.cat([next_values, torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    delta = torch.where(valid, rewards + 0.9 * next_values - values, 0.0)
    torch.testing.assert_close(advantages, delta)


def test_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = ragged_batch(30, [30, 12, 1, 0], seed=6)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    r = torch.where(mask.bool(), rewards, 0.0)
    reward_to_go = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, torch.where(mask.bool(), reward_to_go - values, 0.0))
    torch.testing.assert_close(returns, torch.where(mask.bool(), reward_to_go, 0.0))


@pytest.mark.parametrize("extra", [1, 63, 200])
def test_extra_padding_columns_leave_valid_positions_unchanged(extra):
    rewards, values, mask = ragged_batch(70, [70, 33, 0, 1], seed=7, dtype=torch.float32)
    lam = torch.tensor([0.95, 0.5, 0.9, 1.0])
    advantages, returns = compute_gae(rewards, values, mask, 0.99, lam)

    pad = torch.full((4, extra), 123.0)
    wide = compute_gae(
        torch.cat([rewards, pad], 1), torch.cat([values, pad], 1), torch.cat([mask, pad.long() * 0], 1), 0.99, lam
    )
    torch.testing.assert_close(wide[0][:, :70], advantages, rtol=0, atol=1e-5)
    torch.testing.assert_close(wide[1][:, :70], returns, rtol=0, atol=1e-5)
    assert (wide[0][:, 70:] == 0).all() and (wide[1][:, 70:] == 0).all()


def test_padding_is_exactly_zero_and_returns_are_advantages_plus_values():
    rewards, values, mask = ragged_batch(50, [50, 20, 0, 1, 49], seed=8, dtype=torch.float32)  # nan in padding
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95, last_values=torch.ones(5))
    valid = mask.bool()
    assert (advantages[~valid] == 0).all() and (returns[~valid] == 0).all()
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(returns[valid], advantages[valid] + values[valid])


def test_hand_computed_three_tokens():
    # gamma = 0.5, lam = 0.5; rewards [1, 0, 2], values [1, 2, 4], terminal after the last token.
    # delta_2 = 2 + 0.5*0 - 4 = -2
    # delta_1 = 0 + 0.5*4 - 2 = 0
    # delta_0 = 1 + 0.5*2 - 1 = 1
    # A_2 = -2;  A_1 = 0 + 0.25*(-2) = -0.5;  A_0 = 1 + 0.25*(-0.5) = 0.875
    # returns = A + V = [1.875, 1.5, 2]
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[1.0, 2.0, 4.0]])
    mask = torch.ones(1, 3)
    advantages, returns = compute_gae(rewards, values, mask, 0.5, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.875, -0.5, -2.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.875, 1.5, 2.0]]))

    # Truncated instead, with V(s_3) = 8: delta_2 = 2 + 0.5*8 - 4 = 2; A_2 = 2, A_1 = 0 + 0.25*2 = 0.5,
    # A_0 = 1 + 0.25*0.5 = 1.125.
    advantages, _ = compute_gae(rewards, values, mask, 0.5, 0.5, last_values=torch.tensor([8.0]))
    torch.testing.assert_close(advantages, torch.tensor([[1.125, 0.5, 2.0]]))


def test_bootstrap_only_touches_the_last_valid_token_of_each_row():
    # The bootstrap enters delta at the last valid token only: gamma * last_value, discounted back by gamma*lam.
    rewards, values, mask = ragged_batch(10, [10, 4, 0], seed=9)
    base, _ = compute_gae(rewards, values, mask, 0.9, 0.8)
    boot, _ = compute_gae(rewards, values, mask, 0.9, 0.8, last_values=torch.tensor([1.0, 2.0, 3.0]))
    lengths = torch.tensor([10, 4, 0])
    t = torch.arange(10)
    steps_to_end = (lengths[:, None] - 1 - t[None, :]).clamp(min=0).double()
    expected_shift = 0.9 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:, None] * 0.72**steps_to_end
    torch.testing.assert_close(boot - base, torch.where(mask.bool(), expected_shift, 0.0))


def test_dtypes_bf16_and_float64():
    rewards, values, mask = ragged_batch(40, [40, 10, 0], seed=10, dtype=torch.float32)
    reference, _ = compute_gae(rewards, values, mask, 0.99, 0.95)

    adv_bf16, ret_bf16 = compute_gae(rewards.bfloat16(), values.bfloat16(), mask, 0.99, 0.95)
    assert adv_bf16.dtype == ret_bf16.dtype == torch.bfloat16
    rounded, _ = compute_gae(rewards.bfloat16().float(), values.bfloat16().float(), mask, 0.99, 0.95)
    torch.testing.assert_close(adv_bf16.float(), rounded, rtol=1e-2, atol=1e-2)  # only the output is rounded

    adv64, _ = compute_gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    assert adv64.dtype == torch.float64
    torch.testing.assert_close(adv64.float(), reference, rtol=0, atol=1e-5)


def test_gradients_are_not_propagated_through_targets():
    rewards, values, mask = ragged_batch(8, [8, 3], seed=11, dtype=torch.float32)
    values = torch.nan_to_num(values).requires_grad_()
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad  # GAE targets are constants for the losses
    (values.sum() + returns.sum()).backward()
    torch.testing.assert_close(values.grad, torch.ones_like(values))


def test_empty_shapes():
    a, r = compute_gae(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), 0.99, 0.95)
    assert a.shape == r.shape == (3, 0)
    a, r = compute_gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5), 0.99, torch.zeros(0))
    assert a.shape == r.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask": torch.tensor([[1, 0, 1]])}, "right-padded"),
        ({"lam": 1.5}, r"\[0, 1\]"),
        ({"lam": torch.tensor([0.5, -0.1])}, r"\[0, 1\]"),
        ({"lam": torch.tensor([0.5, 0.5, 0.5])}, r"shape \[B\]"),
        ({"gamma": -0.1}, "gamma"),
        ({"last_values": torch.zeros(2, 1)}, "last_values"),
        ({"values": torch.zeros(2, 4)}, r"\[B, T\]"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    args = {
        "rewards": torch.zeros(2, 3),
        "values": torch.zeros(2, 3),
        "mask": torch.ones(2, 3),
        "gamma": 0.99,
        "lam": 0.95,
        "last_values": None,
    }
    args.update(kwargs)
    if args["mask"].shape[0] == 1:
        args["rewards"], args["values"] = torch.zeros(1, 3), torch.zeros(1, 3)
    with pytest.raises(ValueError, match=match):
        compute_gae(**args)


# --------------------------------------------------------------------------------------------------------------
# Decoupled GAE and length-adaptive lambda
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lam_actor,lam_critic",
    [
        (0.95, 1.0),
        (0.0, 1.0),
        (0.9, 0.9),
        (torch.tensor([0.2, 0.9, 0.99, 0.5]), 1.0),
        (0.95, torch.tensor([1.0, 0.0, 0.7, 0.3])),
    ],
)
def test_decoupled_gae_uses_each_lambda_for_its_target(lam_actor, lam_critic):
    rewards, values, mask = ragged_batch(90, [90, 45, 1, 0], seed=12)
    last_values = torch.tensor([0.5, -0.5, 1.0, 2.0], dtype=torch.float64)
    advantages, returns = compute_decoupled_gae(rewards, values, mask, 0.99, lam_actor, lam_critic, last_values)
    expected_advantages, _ = compute_gae(rewards, values, mask, 0.99, lam_actor, last_values)
    _, expected_returns = compute_gae(rewards, values, mask, 0.99, lam_critic, last_values)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)
    if isinstance(lam_actor, float) and isinstance(lam_critic, float) and lam_actor != lam_critic:
        # A genuinely different target: returns are not advantages + values any more.
        assert not torch.allclose(returns[mask.bool()], (advantages + torch.nan_to_num(values))[mask.bool()])


def test_adaptive_lambda_hand_computed():
    # alpha = 0.05: lambda = 1 - 1/(0.05 * L) = 1 - 20/L
    # L=0 -> 0 (by definition); L=10 -> 1 - 2 = -1 -> clamped 0; L=20 -> 0; L=40 -> 0.5; L=100 -> 0.8;
    # L=1000 -> 0.98
    lengths = torch.tensor([0, 10, 20, 40, 100, 1000])
    lam = adaptive_lambda(lengths, 0.05)
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.8, 0.98]))
    # alpha = 2: L=1 -> 1 - 1/2 = 0.5; L=4 -> 1 - 1/8 = 0.875
    torch.testing.assert_close(
        adaptive_lambda(torch.tensor([1.0, 4.0], dtype=torch.float64), 2.0),
        torch.tensor([0.5, 0.875], dtype=torch.float64),
    )


def test_adaptive_lambda_feeds_compute_gae():
    rewards, values, mask = ragged_batch(60, [60, 30, 0], seed=13)
    lam = adaptive_lambda(mask.sum(-1), 0.1)
    advantages, _ = compute_gae(rewards, values, mask, 1.0, lam)
    expected, _ = closed_form_gae(rewards, values, mask, 1.0, lam)
    torch.testing.assert_close(advantages, expected, rtol=1e-6, atol=1e-6)
    assert math.isclose(float(lam[0]), 1 - 1 / 6, rel_tol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_adaptive_lambda_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        adaptive_lambda(torch.tensor([10]), alpha)
