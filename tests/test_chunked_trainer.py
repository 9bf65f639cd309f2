"""The trainer's log-probs go through `chunked_logprobs` (issue 13, item 1): with `logprob_chunk_size` the rollout
scoring, the reference scoring and the training step give the unchunked trainer's numbers and gradients, and no
full-vocabulary `[B, T, V]` tensor is ever created."""

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM

from trl_gae_ext import PPOTrainer
from trl_gae_ext.modeling import chunkable_lm_head, response_logprobs
from trl_gae_ext.tiny import build_tiny_model


B, P, R, CHUNK = 6, 5, 7, 4


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def make_trainer(tmp_path, tokenizer, layout, chunk, checkpointing=False, **fields):
    args = offline_args(
        tmp_path, per_device_train_batch_size=B, num_mini_batches=1, num_ppo_epochs=1, response_length=R,
        total_episodes=B, temperature=0.7, kl_coef=0.1, kl_in_reward=False, kl_estimator="k3", entropy_coef=0.05,
        value_head=layout, logprob_chunk_size=chunk, activation_checkpointing=checkpointing, **fields,
    )  # fmt: skip
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if layout == "adapter" else None
    model = build_tiny_model(tokenizer, hidden_size=48, num_attention_heads=2)
    trainer = PPOTrainer(model, length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(B)}),
                         processing_class=tokenizer, peft_config=peft)  # fmt: skip
    if checkpointing:  # what `Trainer.train` does before the first step
        trainer.model.activation_checkpointing_enable(args.activation_checkpointing_kwargs)
    return trainer


def padded_batch(tokenizer, seed=0):
    """Left-padded prompts and right-padded responses, with rollout-shaped training inputs."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    ids = torch.randint(4, vocab, (B, P + R), generator=g)
    am = torch.ones(B, P + R, dtype=torch.long)
    prompt_pad = torch.tensor([0, 2, 0, 1, 0, 3])
    response_len = torch.tensor([R, 3, 1, R, 5, 2])
    for i in range(B):
        am[i, : prompt_pad[i]] = 0
        am[i, P + response_len[i] :] = 0
    ids = ids.masked_fill(am == 0, tokenizer.pad_token_id)
    mask = am[:, P:]
    return {
        "input_ids": ids, "attention_mask": am, "response_mask": mask,
        "old_logprobs": -torch.rand(B, R, generator=g) * 3 * mask, "ref_logprobs": -torch.rand(B, R, generator=g) * 3,
        "old_values": torch.randn(B, R, generator=g) * mask, "returns": torch.randn(B, R, generator=g) * mask,
        "advantages": torch.randn(B, R, generator=g) * mask,
    }  # fmt: skip


def score_and_train(trainer, batch):
    """Rollout scoring (policy log-probs, values, reference log-probs) and one training step's outputs and grads."""
    wrapper = trainer.model
    wrapper.eval()
    with torch.no_grad():
        logprobs, values, ref = trainer._score_tokens(wrapper, batch["input_ids"], batch["attention_mask"], R)
    wrapper.train()
    wrapper.zero_grad()
    loss, out = trainer.compute_loss(wrapper, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    return {"logprobs": logprobs, "values": values, "ref": ref, "loss": loss.detach(),
            "train_logprobs": out["logprobs"].detach(), "entropy": out["entropy"].detach()}, grads  # fmt: skip


@pytest.mark.parametrize("layout", ["shared", "adapter"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_trainer_equals_unchunked(tmp_path, tokenizer, layout, checkpointing):
    trainer = make_trainer(tmp_path, tokenizer, layout, CHUNK, checkpointing)
    batch = padded_batch(tokenizer)
    chunked, chunked_grads = score_and_train(trainer, batch)
    trainer.model.logprob_chunk_size = None  # the same weights, full logits
    full, full_grads = score_and_train(trainer, batch)

    assert chunked["ref"] is not None and batch["response_mask"].eq(0).any()
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-5, atol=1e-5, msg=key)
    assert chunked["logprobs"][batch["response_mask"] == 0].abs().max() == 0  # padding: 0, as the full path gives
    assert chunked_grads.keys() == full_grads.keys() and len(full_grads) > 2
    if layout == "shared":  # a full fine-tune: the lm_head itself learns through the chunked backward
        assert any("lm_head" in name for name in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor any op produces whose last dimension is the vocabulary (logits, softmaxes, their
    gradients), in elements; the lm_head weight's `[H, V]` transpose and its gradient are not logits."""

    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.vocab_size, self.weight_numel, self.largest = vocab_size, vocab_size * hidden_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab_size:
                if t.numel() != self.weight_numel:
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layout", ["shared", "adapter"])
def test_no_full_vocabulary_tensor_in_scoring_or_training(tmp_path, tokenizer, layout):
    """Rollout scoring, reference scoring, the loss and its backward never create more than one chunk of logits,
    while the unchunked trainer creates `[B, R, V]` ones."""
    trainer = make_trainer(tmp_path, tokenizer, layout, CHUNK)
    vocab = trainer.model.policy.config.vocab_size
    assert vocab not in (48, P + R)  # no hidden-size or sequence dimension is mistaken for the vocabulary
    batch = padded_batch(tokenizer)
    largest = {}
    for chunk in (CHUNK, None):
        trainer.model.logprob_chunk_size = chunk
        with LargestVocabTensor(vocab, 48) as tracker:
            score_and_train(trainer, batch)
        largest[chunk] = tracker.largest
    assert largest[None] >= B * R * vocab
    assert largest[CHUNK] <= CHUNK * vocab


def test_softcapped_logits_fall_back_to_the_model_forward(tokenizer):
    """Gemma 2's final-logit softcapping is not a plain projection: scoring uses the model's own logits."""
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits well beyond the cap, where the tanh bends them
    assert chunkable_lm_head(model) is None
    assert chunkable_lm_head(build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2)) is not None
    ids = torch.randint(4, len(tokenizer), (2, 8))
    am = torch.ones_like(ids)
    pos = am.cumsum(-1) - 1
    with torch.no_grad():
        got = response_logprobs(model, ids, am, pos, 4, temperature=0.7, chunk_size=2).logprobs
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, -5:-1].float() / 0.7
    expected = logits.log_softmax(-1).gather(-1, ids[:, -4:, None])[..., 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_logprob_chunk_size_is_validated(tmp_path, value):
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        offline_args(tmp_path, logprob_chunk_size=value)
