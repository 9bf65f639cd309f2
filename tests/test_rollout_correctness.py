"""The rollout is what PPO scores, and the metrics say what happened: functional dropout is off (ratio exactly 1 before
the first update), sampling uses only what `PPOConfig` asks for, and logged metrics have the documented values."""

from pathlib import Path

import pytest
import torch
from conftest import make_prompts
from datasets import Dataset
from peft import LoraConfig
from transformers import OPTConfig, OPTForCausalLM

from trl_gae_ext import PPOConfig, PPOTrainer
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
