"""The critic on rewards of any units: the value head starts at zero output (`PPOConfig.value_head_init_std=0`) and
its output scale can be fitted once to the spread of the first rollout's returns (`value_head_return_scale=True`), so
that Adam's steps, which are about the learning rate per weight whatever the gradient's size, are sized to the
returns. On SmolLM2 with a BLEU reward (returns ~0.02) the old random init predicted +-1 and the critic never caught
up (docs/learning.md)."""

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from transformers import TrainerCallback

from trl_gae_ext import PPOTrainer, ValueHead
from trl_gae_ext.tiny import build_tiny_model
from trl_gae_ext.value_head import scaled_scores


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def scaled(reward, factor):
    def func(prompts, completions, **kwargs):
        return [factor * r for r in reward(prompts, completions, **kwargs)]

    func.__name__ = reward.__name__
    return func


class RolloutRecorder(TrainerCallback):
    """Each iteration's experience and the value head's return scale right after that rollout was collected."""

    def __init__(self):
        self.trainer, self.rollouts, self.scales = None, [], []

    def on_step_end(self, args, state, control, **kwargs):
        rollout = self.trainer._rollout
        if not self.rollouts or self.rollouts[-1] is not rollout:
            self.rollouts.append(rollout)
            self.scales.append(float(getattr(self.trainer.model.value_head, "return_scale", float("nan"))))


def make_trainer(tmp_path, tokenizer, reward, **overrides):
    fields = dict(
        per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, response_length=5, learning_rate=3e-3,
        total_episodes=16, kl_coef=0.05, temperature=1.0, logging_steps=1, value_head_return_scale=True,
    )  # fmt: skip
    args = offline_args(tmp_path, **{**fields, **overrides})
    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=0)
    recorder = RolloutRecorder()
    trainer = PPOTrainer(
        model, reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(16)}),
        processing_class=tokenizer, callbacks=[recorder],
    )  # fmt: skip
    recorder.trainer = trainer
    return trainer, recorder


def test_the_untrained_critic_predicts_zero_everywhere(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer, length_reward)
    ids = torch.randint(0, len(tokenizer), (3, 9))
    values = trainer.model(ids, torch.ones_like(ids), num_response_tokens=5)["values"]
    torch.testing.assert_close(values, torch.zeros(3, 5), rtol=0, atol=0)


def test_return_scale_is_fitted_once_to_the_first_rollouts_returns(tmp_path, tokenizer):
    trainer, recorder = make_trainer(tmp_path, tokenizer, scaled(length_reward, 1e-3))
    trainer.train()  # 2 iterations
    first = recorder.rollouts[0]
    mask = first.response_mask.bool()
    # lam_critic=1 (the default): the critic's targets are the Monte Carlo returns
    expected = first.returns[mask].double().std().item()
    assert recorder.scales[0] == pytest.approx(expected, rel=1e-5)
    assert recorder.scales == [recorder.scales[0]] * 2  # kept after the first rollout
    assert first.old_values.abs().max() == 0  # the first rollout's values: zero-initialised head


@pytest.mark.parametrize("mode", ["batch", "first"])
def test_with_score_scaling_training_does_not_depend_on_the_rewards_units(tmp_path, tokenizer, mode):
    """`scale_scores='batch'|'first'`: rewards x 1000 give the same rollouts, the same critic values and the same
    policy, with the KL penalty, value clipping and gradient-norm clipping on. The scores enter the rewards in units of
    their spread, so `kl_coef` weighs the KL against that spread (docs/learning.md measures it on SmolLM2 and the
    demo)."""
    runs = []
    for factor in (1.0, 1000.0):
        trainer, recorder = make_trainer(
            tmp_path / str(factor), tokenizer, scaled(length_reward, factor), total_episodes=24, scale_scores=mode
        )
        trainer.train()  # 3 iterations
        runs.append((trainer, recorder))
    (small, small_rec), (large, large_rec) = runs
    for a, b in zip(small_rec.rollouts, large_rec.rollouts):
        assert torch.equal(a.input_ids, b.input_ids)  # the same samples: the policies stayed equal
        torch.testing.assert_close(b.old_values, a.old_values, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.returns, a.returns, rtol=1e-4, atol=1e-6)
    policy = dict(large.model.policy.named_parameters())
    for name, p in small.model.policy.named_parameters():
        torch.testing.assert_close(policy[name], p, rtol=1e-4, atol=1e-6)
    assert small_rec.rollouts[-1].old_values.abs().max() > 0  # the critic did learn
    # first rollout: KL 0 (reference = policy), gamma = lam_critic = 1, so the first token's return is the scaled score
    first = small_rec.rollouts[0].returns[:, 0].double()
    assert first.std().item() == pytest.approx(1.0, rel=1e-5)
    if mode == "first":  # fitted once, in the reward's units
        assert large.model.score_scale == pytest.approx(1000.0 * small.model.score_scale, rel=1e-5)


class Critic:
    """What `scaled_scores` reads and writes on the trainer's `PolicyValueModel`."""

    score_scale = None


def moments(x, mask):
    return {"mean": x.mean(), "var": x.var()}


def test_scaled_scores_divide_by_the_batch_or_the_first_varied_rollouts_spread():
    first, later, equal = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([10.0, 11.0, 11.5]), torch.full((3,), 0.5)
    torch.testing.assert_close(scaled_scores(first, "none", Critic(), moments), first)
    torch.testing.assert_close(scaled_scores(later, "batch", Critic(), moments), later / later.std())

    critic = Critic()
    torch.testing.assert_close(scaled_scores(equal, "first", critic, moments), equal)  # no spread yet: as is
    assert critic.score_scale is None
    torch.testing.assert_close(scaled_scores(first, "first", critic, moments), first / first.std())
    assert critic.score_scale == pytest.approx(first.std().item())
    torch.testing.assert_close(scaled_scores(later, "first", critic, moments), later / first.std())  # kept


@pytest.mark.parametrize(("given", "mode"), [(True, "batch"), (False, "none"), ("true", "batch"), ("first", "first")])
def test_scale_scores_takes_the_old_booleans(tmp_path, given, mode):
    assert offline_args(tmp_path, scale_scores=given).scale_scores == mode


def test_scale_scores_refuses_unknown_modes(tmp_path):
    with pytest.raises(ValueError, match="scale_scores='group'.*'none', 'batch', 'first'"):
        offline_args(tmp_path, scale_scores="group")


def test_training_does_not_depend_on_the_rewards_units(tmp_path, tokenizer):
    """`scale_scores=False` (the default) with the return scale: rewards x 1000 give the same policy and the critic's values x 1000.
    Without the KL penalty (then in reward units), value clipping (a range in reward units) and gradient-norm clipping
    (the value loss grows with the reward's square), nothing else in PPO has units: advantages are whitened and
    Adam's step ignores the gradient's scale."""
    runs = []
    for factor in (1.0, 1000.0):
        trainer, recorder = make_trainer(
            tmp_path / str(factor), tokenizer, scaled(length_reward, factor), kl_coef=0.0, cliprange_value=None,
            max_grad_norm=0.0, total_episodes=24,
        )  # fmt: skip
        trainer.train()  # 3 iterations
        runs.append((trainer, recorder))
    (small, small_rec), (large, large_rec) = runs
    for a, b in zip(small_rec.rollouts, large_rec.rollouts):
        assert torch.equal(a.input_ids, b.input_ids)  # the same samples: the policies stayed equal
        torch.testing.assert_close(b.old_values, 1000.0 * a.old_values, rtol=1e-3, atol=1e-5)
    policy = dict(large.model.policy.named_parameters())
    for name, p in small.model.policy.named_parameters():
        torch.testing.assert_close(policy[name], p, rtol=1e-4, atol=1e-6)
    assert small_rec.rollouts[-1].old_values.abs().max() > 0  # the critic did learn


def test_return_scale_survives_save_and_load_and_old_heads_load_unscaled(tmp_path):
    torch.manual_seed(0)
    head = ValueHead(16, init_std=0.3)
    head.set_return_scale(2.5)
    head.save_pretrained(tmp_path)
    loaded = ValueHead.from_pretrained(tmp_path)
    hidden = torch.randn(2, 3, 16)
    torch.testing.assert_close(loaded(hidden), head(hidden), rtol=0, atol=0)
    assert bool(loaded.return_scale_fitted)

    old_state = {k: v for k, v in head.state_dict().items() if not k.startswith("return_scale")}
    legacy = ValueHead(16)
    legacy.load_state_dict(old_state)  # a head saved before the scale existed: reward units as it was
    assert float(legacy.return_scale) == 1.0 and bool(legacy.return_scale_fitted)
    torch.testing.assert_close(legacy(hidden), head(hidden) / 2.5)
