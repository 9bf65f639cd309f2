"""Masked statistics, whitening, KL estimators and the PPO losses against hand-computed values."""

import math

import pytest
import torch

from trl_gae_ext.gae import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def log(x):
    return math.log(x)


# --------------------------------------------------------------------------------------------------------------
# Masked statistics and whitening
# --------------------------------------------------------------------------------------------------------------


def test_masked_mean_and_var_hand_computed():
    # valid entries: row 0 -> 1, 2, 3; row 1 -> 10. nan in padding must be ignored.
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # mean = (1 + 2 + 3 + 10) / 4 = 4
    assert masked_mean(values, mask).item() == 4.0
    # row means: (1+2+3)/3 = 2 and 10
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 10.0]))
    # squared deviations from 4: 9, 4, 1, 36 -> sum 50; biased 50/4 = 12.5, unbiased 50/3
    assert masked_var(values, mask, unbiased=False).item() == 12.5
    assert math.isclose(masked_var(values, mask).item(), 50 / 3, rel_tol=1e-6)
    # bool, int and float masks agree
    for m in (mask.bool(), mask.float()):
        assert masked_mean(values, m).item() == 4.0


def test_masked_var_unbiased_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))


def test_masked_whiten_zero_mean_unit_variance_and_zero_padding():
    g = torch.Generator().manual_seed(0)
    values = 3.0 + 2.0 * torch.randn(6, 50, generator=g)
    mask = (torch.arange(50)[None, :] < torch.tensor([50, 40, 1, 0, 25, 7])[:, None]).long()
    values = values.masked_fill(mask == 0, float("inf"))  # garbage in padding
    whitened = masked_whiten(values, mask)
    assert abs(masked_mean(whitened, mask).item()) < 1e-6
    assert abs(masked_var(whitened, mask).item() - 1.0) < 1e-5
    assert (whitened[mask == 0] == 0).all()

    kept = masked_whiten(values, mask, shift_mean=False)
    assert math.isclose(masked_mean(kept, mask).item(), masked_mean(values, mask).item(), rel_tol=1e-5)
    assert (kept[mask == 0] == 0).all()


def test_masked_whiten_uses_precomputed_statistics():
    values = torch.tensor([[1.0, 3.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # (x - 2) / sqrt(4) = [-0.5, 0.5, 1.5], padding 0 (eps=0 for exact numbers)
    out = masked_whiten(values, mask, mean=torch.tensor(2.0), var=torch.tensor(4.0), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-0.5, 0.5, 1.5, 0.0]]))
    # shift_mean=False adds the given mean back: [1.5, 2.5, 3.5]
    out = masked_whiten(values, mask, shift_mean=False, mean=2.0, var=4.0, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[1.5, 2.5, 3.5, 0.0]]))


def test_masked_whiten_keeps_bf16_dtype():
    values = torch.randn(4, 8).bfloat16()
    out = masked_whiten(values, torch.ones(4, 8))
    assert out.dtype == torch.bfloat16
    assert abs(out.float().mean().item()) < 2e-2


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == 1.0
    # predicting the mean 2 everywhere explains nothing
    assert abs(explained_variance(torch.full_like(returns, 2.0), returns, mask).item()) < 1e-7
    # V = [1, 2, 2]: residual [0, 0, 1], Var = 1/3 - 1/9 = 2/9; Var[G] = 2/3; EV = 1 - (2/9)/(2/3) = 2/3
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask)
    assert math.isclose(ev.item(), 2 / 3, rel_tol=1e-6)
    # constant targets: undefined
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask).item())


# --------------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref_logprobs = torch.tensor([[-2.0, -1.0]])
    # log r = ref - logp = [-1, 1]
    # k1 = -log r = [1, -1]; k2 = 0.5 (log r)^2 = [0.5, 0.5]
    # k3 = (r - 1) - log r = [e^-1 - 1 + 1, e - 1 - 1] = [0.367879, 0.718282]
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([[math.exp(-1), math.e - 2.0]]))
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(1)
    logprobs = torch.randn(64, 64, generator=g) * torch.logspace(-8, 1, 64)[None, :]  # tiny and large gaps
    ref = torch.randn(64, 64, generator=g) * torch.logspace(-8, 1, 64)[None, :]
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()
    assert (kl_penalty(logprobs.bfloat16(), ref.bfloat16(), "k3") >= 0).all()


def test_k1_and_k3_means_estimate_the_true_kl():
    g = torch.Generator().manual_seed(2)
    p_logits = torch.randn(10, generator=g)
    q_logits = p_logits + 0.5 * torch.randn(10, generator=g)
    logp, logq = p_logits.log_softmax(0).double(), q_logits.log_softmax(0).double()
    true_kl = (logp.exp() * (logp - logq)).sum().item()  # KL(p || q)
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    logprobs, ref_logprobs = logp[samples][None, :], logq[samples][None, :]
    for estimator in ("k1", "k3"):  # both unbiased for samples drawn from the policy p
        estimate = kl_penalty(logprobs, ref_logprobs, estimator).mean().item()
        assert abs(estimate - true_kl) < 0.05 * true_kl + 1e-3, (estimator, estimate, true_kl)


def test_unknown_kl_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# --------------------------------------------------------------------------------------------------------------
# Policy loss: token level
# --------------------------------------------------------------------------------------------------------------


def _token_case():
    # eps = 0.2. Per token: (rho, A) -> loss = max(-A*rho, -A*clip(rho, 0.8, 1.2)), clipped active?
    # (1.5, +1): max(-1.5, -1.2) = -1.2  clipped   (A > 0, rho > 1 + eps)
    # (0.5, -1): max( 0.5,  0.8) =  0.8  clipped   (A < 0, rho < 1 - eps)
    # (1.1, +2): max(-2.2, -2.2) = -2.2  no        (inside the range)
    # (0.5, +1): max(-0.5, -0.8) = -0.5  no        (A > 0, rho < 1 - eps: pessimistic side, unclipped)
    # (1.5, -1): max( 1.5,  1.2) =  1.5  no        (A < 0, rho > 1 + eps: unclipped)
    # token_mean = (-1.2 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -1.6 / 5 = -0.32; clipfrac = 2/5
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -7.0]])
    logprobs = old.clone()
    logprobs[0, :5] += torch.tensor([log(r) for r in ratios])
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # last token is padding
    return logprobs, old, advantages, mask, ratios


def test_token_level_clipping_hand_computed():
    logprobs, old, advantages, mask, ratios = _token_case()
    logprobs.requires_grad_()
    out = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert math.isclose(out.loss.item(), -0.32, abs_tol=1e-6)
    assert math.isclose(out.clipfrac.item(), 0.4, abs_tol=1e-6)
    # ratio mean = 5.1 / 5 = 1.02; deviations .48, -.52, .08, -.52, .48 -> squares sum 1.008 -> var 0.2016
    assert math.isclose(out.ratio_mean.item(), 1.02, abs_tol=1e-6)
    assert math.isclose(out.ratio_var.item(), 0.2016, abs_tol=1e-6)
    # approx_kl = mean of 0.5 * (log rho)^2 over the 5 valid tokens
    expected_kl = sum(0.5 * log(r) ** 2 for r in ratios) / 5
    assert math.isclose(out.approx_kl.item(), expected_kl, rel_tol=1e-5)
    for stat in out[1:]:
        assert not stat.requires_grad

    # d loss / d logp_t = -A_t * rho_t / 5 where the unclipped term is active, 0 where clipped, 0 on padding:
    # token 2: -2*1.1/5 = -0.44; token 3: -1*0.5/5 = -0.1; token 4: +1*1.5/5 = 0.3
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -0.44, -0.1, 0.3, 0.0]]))


def test_dual_clip_bounds_negative_advantage_losses():
    # eps = 0.2, c = 3.
    # (rho=5, A=-1): max(5, 1.2) = 5 -> min(5, 3) = 3        dual clip active, gradient 0
    # (rho=5, A=+1): max(-5, -1.2) = -1.2                    A > 0: dual clip does not apply
    # (rho=0.5, A=-1): max(0.5, 0.8) = 0.8 -> min(0.8, 3)     below the bound: unchanged
    # mean = (3 - 1.2 + 0.8) / 3 = 2.6 / 3
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[log(5.0), log(5.0), log(0.5)]], requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0, -1.0]])
    out = policy_loss(logprobs, old, advantages, torch.ones(1, 3), cliprange=0.2, dual_clip=3.0)
    assert math.isclose(out.loss.item(), 2.6 / 3, rel_tol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(1, 3))
    # without dual clip the first token costs 5 and has gradient -A*rho/3 = 5/3
    logprobs.grad = None
    out = policy_loss(logprobs, old, advantages, torch.ones(1, 3), cliprange=0.2)
    assert math.isclose(out.loss.item(), (5 - 1.2 + 0.8) / 3, rel_tol=1e-6)
    out.loss.backward()
    assert math.isclose(logprobs.grad[0, 0].item(), 5 / 3, rel_tol=1e-6)


def test_token_mean_and_seq_mean_with_ragged_masks():
    # rho = 1 everywhere, so the per-token loss is -A.
    # row 0: A = 1, 2, 3 (3 tokens); row 1: A = 4 (1 token); row 2: no valid token.
    # token_mean = -(1 + 2 + 3 + 4) / 4 = -2.5
    # seq_mean   = -((1 + 2 + 3) / 3 + 4) / 2 = -(2 + 4) / 2 = -3
    logprobs = torch.zeros(3, 3)
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    token = policy_loss(logprobs, logprobs, advantages, mask, 0.2, loss_aggregation="token_mean")
    seq = policy_loss(logprobs, logprobs, advantages, mask, 0.2, loss_aggregation="seq_mean")
    assert math.isclose(token.loss.item(), -2.5, rel_tol=1e-6)
    assert math.isclose(seq.loss.item(), -3.0, rel_tol=1e-6)
    assert token.clipfrac.item() == 0.0 and token.ratio_mean.item() == 1.0 and token.ratio_var.item() == 0.0


def test_all_padding_gives_zero_loss_and_zero_gradient():
    logprobs = torch.zeros(2, 4, requires_grad=True)
    for aggregation in LOSS_AGGREGATIONS:
        out = policy_loss(
            logprobs, torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4), 0.2, None, "token", aggregation
        )
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert (logprobs.grad == 0).all()


# --------------------------------------------------------------------------------------------------------------
# Policy loss: sequence level (GSPO)
# --------------------------------------------------------------------------------------------------------------


def test_sequence_level_ratio_is_the_geometric_mean():
    # eps = 0.05.
    # row 0: token ratios 2 and 0.5 -> s = sqrt(2 * 0.5) = 1; A = 2 -> loss -2, not clipped
    # row 1: token ratios 1.21 and 1 -> s = sqrt(1.21) = 1.1; A = 1 -> max(-1.1, -1.05) = -1.05, clipped
    # row 2: no valid token -> ignored
    # loss = (-2 - 1.05) / 2 = -1.525; clipfrac = 1/2; ratio mean = (1 + 1.1) / 2 = 1.05, var = 0.05^2 = 0.0025
    old = torch.tensor([[-1.0, -2.0, -4.0], [-1.0, -1.0, -4.0], [0.0, 0.0, 0.0]])
    logprobs = old + torch.tensor([[log(2.0), log(0.5), 3.0], [log(1.21), 0.0, 3.0], [3.0, 3.0, 3.0]])
    logprobs.requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    advantages = torch.tensor([2.0, 1.0, 7.0])
    out = policy_loss(logprobs, old, advantages, mask, cliprange=0.05, ratio_level="sequence")
    assert math.isclose(out.loss.item(), -1.525, rel_tol=1e-6)
    assert math.isclose(out.clipfrac.item(), 0.5, rel_tol=1e-6)
    assert math.isclose(out.ratio_mean.item(), 1.05, rel_tol=1e-6)
    assert math.isclose(out.ratio_var.item(), 0.0025, rel_tol=1e-4)
    # d/d logp_t of (-A * s / 2) with s = exp(mean_t log rho_t): -A * s / (2 * L) = -2 * 1 / (2 * 2) = -0.5 for
    # row 0's tokens; row 1 is clipped (gradient 0); padding 0.
    out.loss.backward()
    expected_grad = torch.tensor([[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)

    # [B, T] advantages: each row's first-token advantage is used, aggregation does not apply.
    token_advantages = advantages[:, None].expand(3, 3).clone()
    token_advantages[:, 1:] = 100.0
    for aggregation in LOSS_AGGREGATIONS:
        again = policy_loss(logprobs, old, token_advantages, mask, 0.05, None, "sequence", aggregation)
        assert math.isclose(again.loss.item(), -1.525, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Robustness: extreme ratios, bf16, bad arguments
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_extreme_log_ratios_give_finite_loss_and_gradients(ratio_level, dual_clip):
    old = torch.zeros(2, 4)
    logprobs = torch.tensor([[50.0, -50.0, 0.1, -float("inf")], [-50.0, 50.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # -inf sits on padding
    advantages = torch.tensor([[-1.0, -1.0, 1.0, 0.0], [1.0, 1.0, -1.0, -1.0]])
    out = policy_loss(logprobs, old, advantages, mask, 0.2, dual_clip, ratio_level)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(stat) for stat in out[1:])
    assert logprobs.grad[0, 3] == 0  # padding gets no gradient


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_bf16_inputs_match_float32(ratio_level):
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 16, generator=g) * 3
    logprobs = (old + 0.1 * torch.randn(4, 16, generator=g)).bfloat16().float()
    old = old.bfloat16().float()
    advantages = torch.randn(4, 16, generator=g).bfloat16().float()
    mask = (torch.arange(16)[None, :] < torch.tensor([16, 9, 1, 0])[:, None]).long()
    reference = policy_loss(logprobs, old, advantages, mask, 0.2, ratio_level=ratio_level)

    lp16 = logprobs.bfloat16().requires_grad_()
    out = policy_loss(lp16, old.bfloat16(), advantages.bfloat16(), mask, 0.2, ratio_level=ratio_level)
    assert out.loss.dtype == torch.float32  # computed in float32
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert lp16.grad.dtype == torch.bfloat16 and torch.isfinite(lp16.grad.float()).all()
    assert lp16.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cliprange": 0.0}, "cliprange"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"ratio_level": "seq"}, "token, sequence"),
        ({"loss_aggregation": "sum"}, "token_mean, seq_mean"),
        ({"advantages": torch.zeros(3)}, "advantages"),
    ],
)
def test_policy_loss_rejects_bad_arguments(kwargs, match):
    args = {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "mask": torch.ones(2, 3),
        "cliprange": 0.2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


# --------------------------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------------------------


def _value_case():
    # old = 0, c = 0.5, so clip(V) = clamp(V, -0.5, 0.5).
    #  V     G   (V-G)^2   clip(V)  (clip(V)-G)^2   max    clipped larger?
    #  1     3      4        0.5       6.25         6.25   yes
    #  2     3      1        0.5       6.25         6.25   yes
    #  0.2   0      0.04     0.2       0.04         0.04   no (inside the range)
    # -1     0      1       -0.5       0.25         1      no (clipping would help: the max keeps the unclipped)
    #  9     9   (padding)
    values = torch.tensor([[1.0, 2.0, 0.2, -1.0, 9.0]])
    returns = torch.tensor([[3.0, 3.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return values, torch.zeros(1, 5), returns, mask


def test_value_loss_clipped_hand_computed():
    values, old, returns, mask = _value_case()
    values.requires_grad_()
    out = value_loss(values, old, returns, mask, cliprange_value=0.5)
    # 0.5 * (6.25 + 6.25 + 0.04 + 1) / 4 = 0.5 * 13.54 / 4 = 1.6925
    assert math.isclose(out.loss.item(), 1.6925, rel_tol=1e-6)
    assert math.isclose(out.clipfrac.item(), 0.5, rel_tol=1e-6)
    # gradient 0.5 * 2 * (V - G) / 4 where unclipped is active: token 2 -> 0.05, token 3 -> -0.25; clipped -> 0
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, 0.05, -0.25, 0.0]]))


@pytest.mark.parametrize("cliprange_value", [None, 0.0])
def test_value_loss_unclipped_hand_computed(cliprange_value):
    values, old, returns, mask = _value_case()
    out = value_loss(values, old, returns, mask, cliprange_value=cliprange_value)
    # 0.5 * (4 + 1 + 0.04 + 1) / 4 = 0.5 * 6.04 / 4 = 0.755
    assert math.isclose(out.loss.item(), 0.755, rel_tol=1e-6)
    assert out.clipfrac.item() == 0.0


def test_value_loss_seq_mean_and_bad_aggregation():
    # row 0 errors (V - G)^2 = 1, 9; row 1 error 4; row 2 empty.
    # token_mean: 0.5 * (1 + 9 + 4) / 3 = 7/3; seq_mean: 0.5 * ((1 + 9)/2 + 4) / 2 = 0.5 * 9 / 2 = 2.25
    values = torch.tensor([[1.0, 3.0], [2.0, 0.0], [5.0, 5.0]])
    returns = torch.zeros(3, 2)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    assert math.isclose(value_loss(values, values, returns, mask).loss.item(), 7 / 3, rel_tol=1e-6)
    seq = value_loss(values, values, returns, mask, loss_aggregation="seq_mean")
    assert math.isclose(seq.loss.item(), 2.25, rel_tol=1e-6)
    with pytest.raises(ValueError, match="token_mean, seq_mean"):
        value_loss(values, values, returns, mask, loss_aggregation="mean")


def test_value_loss_bf16_values():
    values, old, returns, mask = _value_case()
    v16 = values.bfloat16().requires_grad_()
    out = value_loss(v16, old.bfloat16(), returns, mask, cliprange_value=0.5)
    assert out.loss.dtype == torch.float32
    assert math.isclose(out.loss.item(), 1.6925, rel_tol=1e-2)
    out.loss.backward()
    assert torch.isfinite(v16.grad.float()).all()
