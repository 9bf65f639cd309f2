"""QLoRA defaults (issue 13, items 2 and 3): a 4-bit base keeps its unquantized weights (embeddings, lm_head, norms)
in the compute dtype unless `kbit_upcast`, and activation checkpointing is on by default for a 4-bit policy only,
an explicit setting winning."""

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.tiny import build_tiny_model


pytest.importorskip("bitsandbytes")


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def quantized_trainer(tmp_path, model_dir, **fields):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    fields = {"per_device_train_batch_size": 2, "response_length": 3, "total_episodes": 2, **fields}
    args = offline_args(tmp_path, **fields)
    return PPOTrainer(model_dir, length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(4)}),
                      quantization_config=quantization, peft_config=LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip


@pytest.mark.parametrize("upcast", [False, True])
def test_kbit_base_keeps_compute_dtype_unless_upcast(tmp_path, tiny_model_dir, upcast):
    trainer = quantized_trainer(tmp_path, tiny_model_dir, kbit_upcast=upcast)
    base = trainer.model.policy.get_base_model()
    expected = torch.float32 if upcast else torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == expected
    assert base.get_output_embeddings().weight.dtype == expected


@pytest.mark.parametrize("upcast", [False, True])
def test_bf16_kbit_base_first_micro_batch_has_ratio_one_and_kl_zero(tmp_path, tiny_model_dir, upcast):
    """The rollout's old and reference log-probs and the training forward of the first micro-batch agree exactly with
    a bf16 compute dtype, whether or not the unquantized weights are upcast (the measurement behind the default)."""
    trainer = quantized_trainer(tmp_path, tiny_model_dir, kbit_upcast=upcast, kl_in_reward=False, kl_estimator="k3",
                                num_mini_batches=2, response_length=6, total_episodes=4, temperature=0.7)  # fmt: skip
    torch.manual_seed(0)
    rollout = trainer._make_experience([{"prompt": p} for p in make_prompts(4)])
    batch = rollout.select(trainer._plan[0])
    mask = batch["response_mask"].bool()
    out = trainer.model(batch["input_ids"], batch["attention_mask"], mask.shape[1], temperature=0.7)  # with grad
    assert out["logprobs"].requires_grad and mask.any()
    assert (out["logprobs"] - batch["old_logprobs"])[mask].abs().max().item() == 0.0
    assert (batch["old_logprobs"] - batch["ref_logprobs"])[mask].abs().max().item() == 0.0


@pytest.mark.parametrize("explicit", [None, False, True])
def test_checkpointing_defaults_on_for_4bit_only(tmp_path, tiny_model_dir, tokenizer, explicit):
    fields = {} if explicit is None else {"activation_checkpointing": explicit}
    quantized = quantized_trainer(tmp_path / "q", tiny_model_dir, **fields)
    assert quantized.args.activation_checkpointing is (True if explicit is None else explicit)
    assert quantized.args.gradient_checkpointing is quantized.args.activation_checkpointing
    plain = PPOTrainer(build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2), length_reward,
                       args=offline_args(tmp_path / "p", **fields), processing_class=tokenizer)  # fmt: skip
    assert plain.args.activation_checkpointing is bool(explicit)


def test_deprecated_gradient_checkpointing_false_is_respected(tmp_path, tiny_model_dir):
    with pytest.warns(FutureWarning):
        args = PPOConfig(output_dir=str(tmp_path), gradient_checkpointing=False)
    assert args.activation_checkpointing is False
