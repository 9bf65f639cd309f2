"""The rollout is what PPO scores, and the metrics say what happened: functional dropout is off (ratio exactly 1 before
the first update), sampling uses only what `PPOConfig` asks for, and logged metrics have the documented values."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from peft import LoraConfig
from transformers import LogitsProcessorList, OPTConfig, OPTForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trl_gae_ext import PPOTrainer
from trl_gae_ext.gae import explained_variance
from trl_gae_ext.generation import generating_with
from trl_gae_ext.tiny import build_tiny_model


DOC = Path(__file__).resolve().parents[1] / "docs" / "ppo.md"


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1, response_length=6, learning_rate=3e-3, total_episodes=8, kl_coef=0.05, temperature=0.7, logging_steps=1,
    )  # fmt: skip
    return offline_args(tmp_path, **{**defaults, **overrides})


def dataset(n=16):
    return Dataset.from_dict({"prompt": make_prompts(n)})


def llama(tokenizer, **config):
    return build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, **config)


def opt(tokenizer, **config):
    """OPT applies `dropout`, `activation_dropout` and `layerdrop` functionally (facebook/opt-* ship dropout=0.1)."""
    cfg = OPTConfig(
        vocab_size=max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1),
        hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def rollout_of(trainer, n=8):
    torch.manual_seed(0)
    return trainer._make_experience([{"prompt": p} for p in make_prompts(n)])


# --------------------------------------------------------------------------------------------------------------
# item 4 (issue 10): functional dropout
# --------------------------------------------------------------------------------------------------------------
DROPOUT_CASES = {
    "llama-attention_dropout": (lambda tok: llama(tok, attention_dropout=0.2), {}),
    "opt-dropout": (lambda tok: opt(tok, dropout=0.1, activation_dropout=0.1, layerdrop=0.3), {}),
    "llama-lora-adapter-critic": (
        lambda tok: llama(tok, attention_dropout=0.2),
        {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)},
    ),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_first_update_sees_ratio_one_and_unchanged_values(tmp_path, tokenizer, case):
    build, kwargs = DROPOUT_CASES[case]
    trainer = PPOTrainer(build(tokenizer), length_reward, args=make_args(tmp_path), train_dataset=dataset(),
                         processing_class=tokenizer, **kwargs)  # fmt: skip
    rollout = rollout_of(trainer)
    wrapper = trainer.model
    assert wrapper.training  # the updates run in train mode, the rollout was scored in eval mode
    mask = rollout.response_mask.bool()
    with torch.no_grad():  # the whole rollout in one pass, as it was scored: only train/eval mode differs
        out = wrapper(rollout.input_ids, rollout.attention_mask, mask.shape[1], temperature=trainer.args.temperature)
    ratio = torch.exp(out["logprobs"] - rollout.old_logprobs)[mask]
    assert (ratio - 1).abs().max().item() == 0.0
    assert (out["values"] - rollout.old_values)[mask].abs().max().item() == 0.0
    if trainer.ref_model is not None:  # the reference is also free of training-mode randomness
        ids, am, r = rollout.input_ids, rollout.attention_mask, mask.shape[1]
        eval_ref = wrapper.reference_logprobs(ids, am, r, 0.7, ref_model=trainer.ref_model)
        train_ref = wrapper.reference_logprobs(ids, am, r, 0.7, ref_model=trainer.ref_model.train())
        assert torch.equal(eval_ref, train_ref)


# --------------------------------------------------------------------------------------------------------------
# item 5 (issue 10): only PPOConfig's sampling options apply
# --------------------------------------------------------------------------------------------------------------
# what a hub checkpoint's generation_config.json may ship; none of it is in PPOConfig's defaults
CHECKPOINT_SAMPLING = dict(
    min_p=0.3, typical_p=0.5, no_repeat_ngram_size=2, top_k=5, repetition_penalty=1.3, min_new_tokens=3, num_beams=2
)


def peaky_model_with_checkpoint_sampling(tokenizer):
    model = llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # a peaky next-token distribution, like a trained LM's
    for key, value in CHECKPOINT_SAMPLING.items():
        setattr(model.generation_config, key, value)
    return model


def effective_processors(trainer, config):
    """The logits processors `generate` builds for `config` with the trainer's swap of the model's config."""
    policy = trainer.model.policy
    ids, _ = trainer._tokenize_prompts(make_prompts(2))
    with generating_with(policy, config):
        effective, _ = policy._prepare_generation_config(config)
        processors = policy._get_logits_processor(
            effective, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids, logits_processor=LogitsProcessorList()
        )
    return effective, processors


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, [(TemperatureLogitsWarper, "temperature", 0.7)]),
        (
            {"top_k": 4, "top_p": 0.9},
            [(TemperatureLogitsWarper, "temperature", 0.7), (TopKLogitsWarper, "top_k", 4), (TopPLogitsWarper, "top_p", 0.9)],
        ),
    ],
)  # fmt: skip
def test_rollout_processors_are_exactly_those_ppoconfig_asks_for(tmp_path, tokenizer, overrides, expected):
    trainer = PPOTrainer(peaky_model_with_checkpoint_sampling(tokenizer), length_reward,
                         args=make_args(tmp_path, **overrides), train_dataset=dataset(), processing_class=tokenizer)  # fmt: skip
    effective, processors = effective_processors(trainer, trainer.generation_config)
    assert [type(p) for p in processors] == [cls for cls, _, _ in expected]
    for processor, (_, name, value) in zip(processors, expected):
        assert getattr(processor, name) == value
    assert effective.num_beams == 1 and effective.min_new_tokens is None
    assert trainer.model.policy.generation_config.min_p == 0.3  # the checkpoint's own config is restored
    # evaluation is greedy: no processor at all, one beam
    effective, processors = effective_processors(trainer, trainer._generation_config(tokenizer, sampling=False))
    assert len(processors) == 0 and effective.num_beams == 1 and not effective.do_sample


def test_sampled_tokens_come_from_the_distribution_ppo_scores(tmp_path, tokenizer):
    """Under pi_old, E[-log pi_old(y_t)] is the entropy H_t: their per-token difference has mean 0. A processor PPO
    does not score (the checkpoint's min_p, top_k, ...) samples likelier tokens and drives the mean far below 0."""
    trainer = PPOTrainer(peaky_model_with_checkpoint_sampling(tokenizer), length_reward,
                         args=make_args(tmp_path, temperature=1.0, stop_token=None, response_length=8),
                         train_dataset=dataset(), processing_class=tokenizer)  # fmt: skip
    wrapper = trainer.model
    ids, am = trainer._tokenize_prompts(make_prompts(16) * 4)
    torch.manual_seed(0)
    responses = trainer._generate(wrapper, ids, am, trainer.generation_config)
    wrapper.eval()
    with torch.no_grad():
        out = wrapper(torch.cat([ids, responses], 1), torch.cat([am, torch.ones_like(responses)], 1),
                      responses.shape[1], temperature=1.0, compute_entropy=True)  # fmt: skip
    diff = (-out["logprobs"] - out["entropy"]).flatten()
    standard_error = diff.std().item() / math.sqrt(diff.numel())
    assert abs(diff.mean().item()) < 4 * standard_error, (diff.mean().item(), standard_error)


# --------------------------------------------------------------------------------------------------------------
# item 8 (issue 10): metrics, by value
# --------------------------------------------------------------------------------------------------------------
def test_num_eos_tokens_counts_finished_responses(tmp_path, tokenizer):
    trainer = PPOTrainer(llama(tokenizer), length_reward, args=make_args(tmp_path, temperature=1.0, response_length=8),
                         train_dataset=dataset(), processing_class=tokenizer)  # fmt: skip
    rollout = rollout_of(trainer, n=16)
    r = rollout.response_mask.shape[1]
    is_eos = (rollout.input_ids[:, -r:] == tokenizer.eos_token_id) & rollout.response_mask.bool()
    finished = int(is_eos.any(dim=1).sum())
    assert 0 < finished < 16  # the check means something
    assert trainer._metrics["val/num_eos_tokens"] == [float(finished)]


def test_nonfinite_losses_are_counted_in_each_logging_window(tmp_path, tokenizer):
    def huge(prompts, completions, **kwargs):
        return [3e38] * len(prompts)  # finite, but its square overflows in the value loss: every loss is inf

    # 2 rollouts of 8 prompts, 2 optimizer steps each, 2 micro-batches per step; one log per optimizer step
    args = make_args(tmp_path, total_episodes=16, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     whiten_advantages=False)  # fmt: skip
    trainer = PPOTrainer(llama(tokenizer), huge, args=args, train_dataset=dataset(), processing_class=tokenizer)
    trainer.train()
    logged = [h["nonfinite/loss"] for h in trainer.state.log_history if "nonfinite/loss" in h]
    assert logged == [2, 2, 2, 2]


def test_episode_is_the_latest_count_not_a_window_mean(tmp_path, tokenizer):
    # rollouts of 8 episodes, 2 optimizer steps each; a log every 4 steps covers 2 rollouts
    args = make_args(tmp_path, total_episodes=32, logging_steps=4)
    trainer = PPOTrainer(
        llama(tokenizer), length_reward, args=args, train_dataset=dataset(), processing_class=tokenizer
    )
    trainer.train()
    assert [h["episode"] for h in trainer.state.log_history if "episode" in h] == [16, 32]


def test_explained_variance_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    values, returns = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.3
    v, r = values[mask].double(), returns[mask].double()
    expected = 1 - ((r - v) - (r - v).mean()).pow(2).mean() / (r - r.mean()).pow(2).mean()
    assert math.isclose(explained_variance(values, returns, mask).item(), expected.item(), rel_tol=1e-5)
    # returns equal up to rounding (what GAE gives for one score and no KL): Var[G] is 0, so undefined, not -1e14
    ulp = torch.finfo(torch.float32).eps
    rounded = 1.0 + ulp * torch.randint(-3, 4, (6, 9), generator=g).float()
    assert math.isnan(explained_variance(values, rounded, mask).item())
    assert math.isnan(explained_variance(values, torch.ones(6, 9), mask).item())


def test_explained_var_is_logged_as_zero_for_constant_returns(tmp_path, tokenizer):
    def constant(prompts, completions, **kwargs):
        return [1.0] * len(prompts)

    trainer = PPOTrainer(llama(tokenizer), constant, args=make_args(tmp_path, kl_coef=0.0), train_dataset=dataset(),
                         processing_class=tokenizer)  # fmt: skip
    rollout_of(trainer)
    assert trainer._metrics["val/returns_mean"] == [1.0]
    assert trainer._metrics["val/explained_var"] == [0.0]


def documented_metrics() -> set[str]:
    section = DOC.read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.MULTILINE):
        names.update(re.findall(r"`([^`]+)`", row))
    return names


def test_metrics_table_lists_exactly_what_is_logged(tmp_path, tokenizer):
    # kl_in_reward=False adds `loss/kl_avg`, scale_scores="first" `objective/score_scale`; evaluate() the eval metrics
    args = make_args(tmp_path, kl_in_reward=False, kl_estimator="k3", scale_scores="first")
    trainer = PPOTrainer(llama(tokenizer), length_reward, args=args, train_dataset=dataset(),
                         eval_dataset=dataset(4), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.evaluate()
    trainer_own = {"loss", "grad_norm", "learning_rate", "epoch", "eval_runtime", "eval_samples_per_second",
                   "eval_steps_per_second", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                   "train_loss", "total_flos", "step"}  # fmt: skip
    logged = {k for h in trainer.state.log_history for k in h} - trainer_own
    logged = {re.sub(r"rewards/length_reward/", "rewards/<name>/", k) for k in logged}
    assert logged == documented_metrics()
