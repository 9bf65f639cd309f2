"""Correctness of the PEFT/QLoRA paths: gradient checkpointing with adapter switching, the reference policy of a
PEFT policy, and the critic warm-up. Real tiny models, real PEFT and bitsandbytes (NF4 on the CPU)."""

import importlib.util

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_gae_ext import PPOTrainer
from trl_gae_ext.tiny import build_tiny_model


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)


def four_bit():
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )  # fmt: skip


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1, response_length=5, total_episodes=4, learning_rate=1e-2, kl_coef=0.1, kl_estimator="k3", temperature=1.0,
    )  # fmt: skip
    return offline_args(tmp_path, **{**defaults, **overrides})


def tiny(tokenizer, seed=0):
    return build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=seed)


def sft_adapter(model, seed=1):
    """A PeftModel whose adapter is already trained (non-zero B matrices), as after SFT."""
    peft_model = get_peft_model(model, lora())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return peft_model


def make_trainer(tmp_path, model, tokenizer, layout="auto", peft_config=None, quantized=False, **overrides):
    return PPOTrainer(
        model, length_reward, args=make_args(tmp_path, value_head=layout, **overrides),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}), processing_class=tokenizer,
        peft_config=peft_config, quantization_config=four_bit() if quantized else None,
    )  # fmt: skip


def fixed_batch(tokenizer):
    """Prompt + response ids with left-padded prompts of different lengths."""
    prompts = tokenizer(make_prompts(4)[:2] + ["say a word", "say"], padding=True, padding_side="left")
    ids, mask = torch.tensor(prompts["input_ids"]), torch.tensor(prompts["attention_mask"])
    response = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in ["alpha", "beta", "gamma"]]).repeat(4, 1)
    return torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1), 3


# -- 1. gradient checkpointing: the update with checkpointing equals the update without -----------------------------

# (layout, PEFT policy, 4-bit base): the critic reads the policy's hidden states, a second adapter on its base, or
# its own backbone
NEEDS_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
CHECKPOINT_CASES = [
    ("shared", False, False),
    ("shared", True, False),
    ("separate", False, False),
    ("adapter", True, False),
    pytest.param(("adapter", True, True), marks=NEEDS_BNB),
]


def _build(case, tmp_path, tokenizer, tiny_model_dir, **overrides):
    layout, peft, quantized = case
    model = tiny_model_dir if quantized else tiny(tokenizer)
    return make_trainer(
        tmp_path, model, tokenizer, layout, peft_config=lora() if peft else None, quantized=quantized, **overrides
    )


def _critic_names(trainer):
    layout = trainer.model.layout
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    if layout == "adapter":
        return [n for n in names if ".critic." in n]
    if layout == "separate":
        return [n for n in names if n.startswith("critic.")]
    return [n for n in names if n.startswith("policy.")]  # shared: the value loss trains the policy's body


def _grads(trainer, batch) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: f"{c[0]}{'-lora' if c[1] else ''}{'-4bit' * c[2]}")
def test_gradients_with_checkpointing_equal_gradients_without(case, tmp_path, tokenizer, tiny_model_dir):
    trainer = _build(case, tmp_path, tokenizer, tiny_model_dir)
    model = trainer.model
    batch = trainer._make_experience([{"prompt": p} for p in make_prompts(4)]).select(torch.arange(4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B: both adapters change the forward, and the A matrices get gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.train()
    plain = _grads(trainer, batch)
    model.activation_checkpointing_enable()  # what `Trainer.train` calls for `gradient_checkpointing=True`
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = _grads(trainer, batch)
    assert plain.keys() == checkpointed.keys()
    critic = _critic_names(trainer)
    assert critic and all(n in plain and plain[n].abs().sum() > 0 for n in critic)  # not vacuous
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: f"{c[0]}{'-lora' if c[1] else ''}{'-4bit' * c[2]}")
def test_one_sgd_update_with_checkpointing_equals_the_update_without(case, tmp_path, tokenizer, tiny_model_dir):
    deltas = []
    for checkpointing in (False, True):
        trainer = _build(
            case, tmp_path / str(checkpointing), tokenizer, tiny_model_dir,
            optim="sgd", max_grad_norm=0.0, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        after = dict(trainer.model.named_parameters())
        deltas.append({n: after[n].detach() - b for n, b in before.items()})
    plain, checkpointed = deltas
    assert any(plain[n].abs().sum() > 0 for n in _critic_names(trainer))  # the critic did learn
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)


def test_a_user_context_fn_is_kept_with_the_adapter_layout(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tiny(tokenizer), tokenizer, "adapter", peft_config=lora())
    batch = trainer._make_experience([{"prompt": p} for p in make_prompts(4)]).select(torch.arange(4))
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.normal_(0, 0.3)
    trainer.model.train()
    plain = _grads(trainer, batch)
    calls = []

    def context_fn():
        calls.append(1)
        return torch.utils.checkpoint.noop_context_fn()

    trainer.model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": context_fn})
    checkpointed = _grads(trainer, batch)
    assert len(calls) == 4  # 2 layers, policy and critic forward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_is_refused_for_the_adapter_layout(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="non-reentrant"):
        make_trainer(
            tmp_path, tiny(tokenizer), tokenizer, "adapter", peft_config=lora(),
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        )  # fmt: skip


# -- 2. the reference is the initial policy: KL 0 at the first rollout ----------------------------------------------


def _plain(tokenizer, tiny_model_dir):
    return tiny(tokenizer), {}


def _sft(tokenizer, tiny_model_dir):
    return sft_adapter(tiny(tokenizer)), {}


def _sft_4bit(tokenizer, tiny_model_dir):
    return sft_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=four_bit())), {}


def _sft_with_value_model(tokenizer, tiny_model_dir):
    return sft_adapter(tiny(tokenizer)), {"value_model": tiny(tokenizer, seed=3)}


def _fresh(**lora_kwargs):
    def build(tokenizer, tiny_model_dir):
        return tiny(tokenizer), {"peft_config": lora(**lora_kwargs)}

    return build


# (policy, layout, whether the initial policy is the model handed over): an adapter that is not the identity at the
# start (a trained adapter, a random or PiSSA init) makes the base with adapters disabled another policy than the
# initial one. A random init is a new policy; PiSSA moves the top singular directions of each weight into the adapter.
REFERENCE_CASES = {
    "plain-shared": (_plain, "shared", True),
    "plain-separate": (_plain, "separate", True),
    "sft-adapter": (_sft, "adapter", True),
    "sft-shared": (_sft, "shared", True),
    "sft-separate-value-model": (_sft_with_value_model, "separate", True),
    "sft-4bit-adapter": (_sft_4bit, "adapter", True),
    "sft-4bit-shared": (_sft_4bit, "shared", True),
    "random-init-adapter": (_fresh(init_lora_weights=False), "adapter", False),
    "pissa-adapter": (_fresh(init_lora_weights="pissa"), "adapter", True),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS_BNB) if "4bit" in n else n for n in REFERENCE_CASES])
def test_the_reference_is_the_initial_policy(name, tmp_path, tokenizer, tiny_model_dir):
    build, layout, starts_as_given = REFERENCE_CASES[name]
    model, kwargs = build(tokenizer, tiny_model_dir)
    value_model = kwargs.pop("value_model", None)
    ids, mask, r = fixed_batch(tokenizer)
    with torch.no_grad():  # the policy as handed over (PEFT's PiSSA init happens inside the trainer, exactly)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -r - 1 : -1]
    initial = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -r:, None])[..., 0]
    trainer = PPOTrainer(
        model, length_reward, args=make_args(tmp_path, value_head=layout),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}), processing_class=tokenizer,
        value_model=value_model, **kwargs,
    )  # fmt: skip
    wrapper = trainer.model.eval()
    policy, _, ref = trainer._score_tokens(wrapper, ids, mask, r)
    atol = 1e-4 if "pissa" in name else 1e-5  # PiSSA splits each weight by an SVD: base + adapter = W up to rounding
    if starts_as_given:  # adding the critic and reference adapters left the policy as it was
        torch.testing.assert_close(policy, initial, rtol=0, atol=atol)
    torch.testing.assert_close(ref, policy, rtol=0, atol=1e-6)
    trainer._make_experience([{"prompt": p} for p in make_prompts(4)])
    assert abs(trainer._metrics["objective/kl"][-1]) < 1e-5


def test_the_reference_adapter_is_frozen_unsaved_and_kept_through_training(tmp_path, tokenizer):
    trainer = PPOTrainer(
        sft_adapter(tiny(tokenizer)), length_reward, args=make_args(tmp_path, learning_rate=3e-2),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}), processing_class=tokenizer,
    )  # fmt: skip
    wrapper = trainer.model
    ids, mask, r = fixed_batch(tokenizer)
    with torch.no_grad():
        initial = wrapper.eval()(ids, mask, r, compute_values=False)["logprobs"]
    ref_params = [n for n, _ in wrapper.named_parameters() if ".ref." in n]
    assert ref_params and not any(p.requires_grad for n, p in wrapper.named_parameters() if ".ref." in n)
    trainer.train()
    with torch.no_grad():
        policy = wrapper.eval()(ids, mask, r, compute_values=False)["logprobs"]
        ref = wrapper.reference_logprobs(ids, mask, r)
    assert (policy - initial).abs().max() > 1e-3  # the policy moved
    torch.testing.assert_close(ref, initial, rtol=0, atol=1e-6)  # the reference did not
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert not (out / "ref").exists() and (out / "critic" / "adapter_model.safetensors").exists()


# -- 3. critic warm-up: the policy does not move, the critic does ----------------------------------------------------


@pytest.mark.parametrize("layout", ["shared", "separate", "adapter"])
def test_critic_warmup_leaves_the_policy_unchanged(layout, tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tiny(tokenizer), tokenizer, layout, peft_config=lora() if layout == "adapter" else None,
        critic_warmup_steps=1, total_episodes=8, num_mini_batches=2, num_ppo_epochs=2, weight_decay=0.1,
    )  # fmt: skip
    wrapper = trainer.model
    ids, mask, r = fixed_batch(tokenizer)
    with torch.no_grad():
        before = wrapper.eval()(ids, mask, r)
    head = {n: p.detach().clone() for n, p in wrapper.value_head.named_parameters()}
    trainer.train()  # one PPO iteration, all of it critic warm-up
    assert trainer.state.global_step == trainer.args.steps_per_rollout == 4
    with torch.no_grad():
        after = wrapper.eval()(ids, mask, r)
    assert torch.equal(after["logprobs"], before["logprobs"])
    assert (after["values"] - before["values"]).abs().max() > 1e-3
    assert any(not torch.equal(p, head[n]) for n, p in wrapper.value_head.named_parameters())
