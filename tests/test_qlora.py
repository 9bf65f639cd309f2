"""4-bit QLoRA on one shared base, with real bitsandbytes NF4 on the CPU."""

import pytest
import torch
from conftest import make_prompts
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.qlora import consumer_gpu_defaults


bnb = pytest.importorskip("bitsandbytes")


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def quantization():
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip


def make_trainer(tmp_path, model_dir, value_head="adapter", **overrides):
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=2,
        response_length=5, total_episodes=8, learning_rate=1e-2, temperature=1.0, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=True, value_head=value_head,
    )  # fmt: skip
    args.update(overrides)
    return PPOTrainer(
        model_dir, length_reward, args=PPOConfig(**args),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}),
        quantization_config=quantization(), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )  # fmt: skip


def four_bit_weights(module):
    return {m.weight.data_ptr(): m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("qlora")
    trainer = make_trainer(tmp_path, tiny_model_dir)
    base_before = {p: m.weight.detach().clone() for p, m in four_bit_weights(trainer.model).items()}
    params_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, base_before, params_before, tmp_path


def test_one_quantized_base_serves_policy_critic_and_reference(trained):
    trainer, *_ = trained
    weights = four_bit_weights(trainer.model)
    # 2 blocks x (q, k, v, o, gate, up, down): each quantized once, and nothing else holds base weights
    assert len(weights) == 14
    assert trainer.ref_model is None and trainer.model.critic is None


def test_both_adapters_learn_and_the_base_never_changes(trained):
    trainer, base_before, params_before, _ = trained
    after = dict(trainer.model.named_parameters())
    moved = {n for n, p in params_before.items() if not torch.equal(p, after[n].detach())}
    assert any(".lora_B.default." in n for n in moved) and any(".lora_B.critic." in n for n in moved)
    assert any(n.startswith("value_head.") for n in moved)
    assert all("lora_" in n or n.startswith("value_head.") for n in moved), sorted(moved)[:5]
    for ptr, module in four_bit_weights(trainer.model).items():
        assert torch.equal(base_before[ptr], module.weight.detach())


def test_reference_is_the_base_with_adapters_off(trained, tiny_model_dir):
    trainer, *_ = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization())
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    ref = trainer.model.reference_logprobs(ids, mask, 3)
    logits = base(ids).logits[:, -4:-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -3:, None])[..., 0]
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    policy = trainer.model(ids, mask, 3, compute_values=False)["logprobs"]
    assert not torch.allclose(policy, ref)  # the trained adapter is active outside the reference pass


def test_save_and_reload_policy_and_critic(trained, tiny_model_dir):
    trainer, _, _, tmp_path = trained
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out, quantization_config=quantization())
    ids = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model.policy(ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "critic" / "adapter_model.safetensors").exists() and (
        out / "critic" / "value_head.safetensors"
    ).exists()
    fresh = make_trainer(tmp_path / "fresh", tiny_model_dir)
    fresh.model.load_critic(str(out))
    a = {n: p for n, p in trainer.model.named_parameters() if ".critic." in n or n.startswith("value_head.")}
    b = dict(fresh.model.named_parameters())
    assert a and all(torch.equal(p, b[n]) for n, p in a.items())


def test_shared_value_head_on_4bit(tmp_path, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, value_head="shared", num_ppo_epochs=1)
    head = {n: p.detach().clone() for n, p in trainer.model.value_head.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, dict(trainer.model.value_head.named_parameters())[n]) for n, p in head.items())
    assert not any(".critic." in n for n, _ in trainer.model.named_parameters())


def test_consumer_gpu_defaults():
    quant, lora = consumer_gpu_defaults()
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16 and lora.target_modules == "all-linear"
