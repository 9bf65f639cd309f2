"""The PPO update does not depend on bookkeeping: how a minibatch is split into micro-batches (gradient accumulation),
or where a run was checkpointed and resumed."""

import os

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.gae import aggregate_loss, policy_loss, value_loss
from trl_gae_ext.tiny import build_tiny_model


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, response_length=6, learning_rate=3e-3, total_episodes=16, kl_coef=0.05, temperature=0.7, logging_steps=1,
    )  # fmt: skip
    return offline_args(tmp_path, **{**defaults, **overrides})


def make_trainer(tokenizer, args, n=16, **kwargs):
    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=0)
    dataset = Dataset.from_dict({"prompt": make_prompts(n)})
    return PPOTrainer(model, length_reward, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


# -- token and sequence means over the minibatch -------------------------------------------------------------------
def test_micro_batch_losses_add_up_to_the_minibatch_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    # token mean: (1 + 2 + 3 + 4 + 5 + 7) / 6 = 22 / 6; sequence mean: (2 + 4 + 6) / 3 = 4
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(22 / 6)
    assert aggregate_loss(per_token, mask, "seq_mean").item() == pytest.approx(4.0)
    # split [rows 0, 1] + [row 2]: each part divided by the minibatch's 6 tokens / 3 rows
    parts = [slice(0, 2), slice(2, 3)]
    token = sum(aggregate_loss(per_token[p], mask[p], "token_mean", num_tokens=6) for p in parts)
    seq = sum(aggregate_loss(per_token[p], mask[p], "seq_mean", num_seqs=3) for p in parts)
    assert token.item() == pytest.approx(22 / 6) and seq.item() == pytest.approx(4.0)
    # each part's own mean would give (6 + 4) / 4 + 12 / 2 = 8.5 and (2 + 4) / 2 + 6 = 9: what normalisers fix
    assert sum(aggregate_loss(per_token[p], mask[p], "token_mean") for p in parts).item() == pytest.approx(8.5)
    with pytest.raises(ValueError, match="must be > 0"):
        aggregate_loss(per_token, mask, num_tokens=0)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_split_losses_have_the_gradient_of_the_whole(aggregation):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    mask = (torch.arange(T) < torch.tensor([5, 1, 3, 2])[:, None]).long()  # ragged rows
    logp = (torch.randn(B, T, generator=g) * 0.1 - 1).requires_grad_()
    values = torch.randn(B, T, generator=g).requires_grad_()
    old, adv, ret = logp.detach() - 0.05, torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def grads(parts, **norm):
        logp.grad = values.grad = None
        for p in parts:
            pg = policy_loss(logp[p], old[p], adv[p], mask[p], 0.2, loss_aggregation=aggregation, **norm)
            vf = value_loss(values[p], values[p].detach() + 0.1, ret[p], mask[p], 0.2, aggregation, **norm)
            (pg.loss + vf.loss).backward()
        return logp.grad.clone(), values.grad.clone()

    whole = grads([slice(0, 4)])
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(B)}
    for split in ([slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]):
        for a, b in zip(whole, grads(split, **counts)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- the trainer: gradient accumulation ----------------------------------------------------------------------------
SPLITS = [(4, 1), (2, 2), (1, 4)]  # per_device_train_batch_size x gradient_accumulation_steps = one minibatch of 4
LOSSES = [
    pytest.param(
        {"loss_aggregation": "token_mean", "kl_in_reward": False, "kl_estimator": "k3", "entropy_coef": 0.01},
        id="token_mean-kl-entropy",
    ),  # fmt: skip
    pytest.param({"loss_aggregation": "seq_mean"}, id="seq_mean"),
    pytest.param({"advantage_level": "sequence"}, id="sequence-ratio"),
]


@pytest.mark.parametrize("overrides", LOSSES)
def test_one_update_does_not_depend_on_gradient_accumulation(tmp_path, tokenizer, overrides):
    """One SGD step (constant lr, no clipping) on one rollout of 4 ragged responses, split 4x1, 2x2 and 1x4."""
    updates, logged = [], []
    for micro, accumulation in SPLITS:
        args = make_args(tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                         num_mini_batches=1, num_ppo_epochs=1, total_episodes=4, optim="sgd", learning_rate=1e-2,
                         max_grad_norm=0.0, lr_scheduler_type="constant", **overrides)  # fmt: skip
        trainer = make_trainer(tokenizer, args)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        lengths = trainer._rollout.response_mask.sum(1)
        assert len(set(lengths.tolist())) > 1, "the test needs ragged responses"
        after = dict(trainer.model.named_parameters())
        updates.append({n: after[n].detach() - b for n, b in before.items()})
        logged.append(next(h for h in trainer.state.log_history if "loss/value_avg" in h))
    reference = updates[0]
    for prefix in ("policy.", "value_head.", "critic."):  # the policy and the critic both move, by the same step
        assert any(reference[n].abs().max() > 0 for n in reference if n.startswith(prefix)), prefix
    norm = torch.sqrt(sum((d**2).sum() for d in reference.values()))
    for (micro, accumulation), update in zip(SPLITS[1:], updates[1:]):
        diff = torch.sqrt(sum(((update[n] - reference[n]) ** 2).sum() for n in reference))
        assert diff / norm < 1e-5, f"{micro}x{accumulation}: relative difference {diff / norm:.2e}"
    # the logged losses are the minibatch's, whatever the split
    for key in ("loss/value_avg", "loss/policy_avg", "policy/entropy_avg", "loss", "loss/kl_avg"):
        if key in logged[0]:
            assert [h[key] for h in logged] == pytest.approx([logged[0][key]] * 3, rel=1e-5, abs=1e-6), key


# -- the trainer: checkpoints land between rollouts ----------------------------------------------------------------
def test_a_config_with_three_ppo_epochs_constructs(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), num_ppo_epochs=3)  # default save_steps=500 is not a multiple of 3
    assert args.steps_per_rollout == 3 and args.save_steps == 500


def _checkpoints(directory) -> list[int]:
    return sorted(int(name.split("-")[1]) for name in os.listdir(directory) if name.startswith("checkpoint-"))


# steps_per_rollout = 2 epochs x 2 minibatches = 4; 24 prompts at 8 per rollout
SAVES = [
    # save_steps=0.5 of 12 steps is step 6, mid-rollout: saved at 8; the last step, 12, is saved as always
    pytest.param({"save_steps": 0.5, "total_episodes": 24}, [8, 12], 8, id="ratio"),
    # max_steps=10 rounds up to 12 (3 rollouts); saves due at 3, 6, 9, 12 land at 4, 8, 12; evaluations too
    pytest.param(
        {"save_steps": 3, "total_episodes": None, "max_steps": 10, "eval_strategy": "steps", "eval_steps": 3},
        [4, 8, 12],
        4,
        id="non-multiple",
    ),  # fmt: skip
]


@pytest.mark.parametrize("overrides, expected, resume_at", SAVES)
def test_checkpoints_land_between_rollouts_and_resume_exactly(tmp_path, tokenizer, overrides, expected, resume_at):
    def run(output, resume=None):
        args = make_args(tmp_path, output_dir=str(tmp_path / output), save_strategy="steps", **overrides)
        eval_dataset = Dataset.from_dict({"prompt": make_prompts(4)}) if "eval_steps" in overrides else None
        trainer = make_trainer(tokenizer, args, n=24, eval_dataset=eval_dataset)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    assert straight.args.steps_per_rollout == 4 and straight.state.global_step == 12
    assert _checkpoints(tmp_path / "straight") == expected
    evaluated = [h["step"] for h in straight.state.log_history if "eval_reward" in h]
    assert all(step % 4 == 0 for step in evaluated)
    resumed = run("resumed", resume=str(tmp_path / "straight" / f"checkpoint-{resume_at}"))
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
