"""The rollout is what PPO scores, and the metrics say what happened: functional dropout is off (ratio exactly 1 before
the first update), sampling uses only what `PPOConfig` asks for, and logged metrics have the documented values."""

import math
from pathlib import Path

import pytest
import torch
from conftest import make_prompts
from datasets import Dataset
from peft import LoraConfig
from transformers import LogitsProcessorList, OPTConfig, OPTForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.generation import generating_with
from trl_gae_ext.tiny import build_tiny_model


DOC = Path(__file__).resolve().parents[1] / "docs" / "ppo.md"


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_mini_batches=2,
        num_ppo_epochs=1,
        response_length=6,
        learning_rate=3e-3,
        total_episodes=8,
        kl_coef=0.05,
        temperature=0.7,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(overrides)
    return PPOConfig(**defaults)


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
