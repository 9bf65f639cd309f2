"""Does a float32 embedding / lm_head matter for PPO's log-ratio on a 4-bit base? (issue 13, item 2)

Runs the first PPO iteration of SmolLM2-135M-Instruct (real weights, `trl_gae_ext.assets`) loaded in 4-bit NF4 with
a bfloat16 compute dtype, an adapter critic and a `ref` adapter, once with `kbit_upcast=True` (peft's
`prepare_model_for_kbit_training`: embeddings, lm_head and norms in float32) and once with False (all in bfloat16).
On the first micro-batch the policy has not moved yet, so the training forward must reproduce the rollout's scores:
it prints max|ratio - 1| over the valid tokens (training log-probs vs the rollout's old log-probs) and max|old - ref|
(the rollout's KL term, which is 0 before any update).

    python benchmarks/kbit_upcast.py [--tiny] [--bf16-autocast]

`--tiny` uses a Llama-style model with random weights (hidden 128, 2 layers, a word-level vocabulary of the prompts)
instead of SmolLM2: minutes instead of tens of minutes on a loaded 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from trl_gae_ext import PPOConfig, PPOTrainer  # noqa: E402
from trl_gae_ext.assets import smollm2_path, translation_datasets  # noqa: E402
from trl_gae_ext.tiny import build_tiny_model, build_tokenizer  # noqa: E402


def length_reward(prompts, completions, **kwargs):
    return [len(c) / 50 for c in completions]


def tiny_model_dir(prompts: list[str], out_dir: str) -> str:
    """A random-weight Llama-style model and a word-level tokenizer of `prompts`, saved to `out_dir`."""
    tokenizer = build_tokenizer(prompts)
    build_tiny_model(tokenizer, hidden_size=128, num_hidden_layers=2).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def first_micro_batch(model: str, upcast: bool, autocast: bool, out_dir: str) -> dict[str, float]:
    """max|ratio - 1| and max|old - ref| on the first micro-batch of one PPO iteration."""
    args = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1, response_length=16,
        total_episodes=8, learning_rate=1e-4, kl_coef=0.05, kl_in_reward=False, kl_estimator="k3",
        value_head="adapter", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        kbit_upcast=upcast, bf16=autocast, temperature=0.7,
    )  # fmt: skip
    train, _ = translation_datasets(num_train=8)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    trainer = PPOTrainer(
        model, length_reward, args=args, train_dataset=train, quantization_config=quantization,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    dtypes = {p.dtype for p in trainer.model.policy.get_base_model().get_output_embeddings().parameters()}
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, out = compute_loss(model, inputs, True, num_items_in_batch)
        seen.append(
            (out["logprobs"].detach(), inputs["old_logprobs"], inputs["ref_logprobs"], inputs["response_mask"])
        )
        return (loss, out) if return_outputs else loss

    trainer.compute_loss = recording
    trainer.train()
    new, old, ref, mask = seen[0]
    mask = mask.bool()
    return {
        "lm_head_dtype": str(dtypes.pop()).replace("torch.", ""),
        "max_abs_ratio_minus_1": (torch.exp(new - old)[mask] - 1).abs().max().item(),
        "max_abs_old_minus_ref": (old - ref)[mask].abs().max().item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16-autocast", action="store_true", help="also train under bf16 autocast (bf16=True)")
    parser.add_argument("--tiny", action="store_true", help="a random-weight tiny model instead of SmolLM2")
    options = parser.parse_args(argv)
    print(f"{'kbit_upcast':>16} {'lm_head':>8} {'max|ratio-1|':>13} {'max|old-ref|':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        model = smollm2_path()
        if options.tiny:
            prompts = translation_datasets(num_train=64)[0]["prompt"]
            model = tiny_model_dir([p if isinstance(p, str) else p[-1]["content"] for p in prompts], tmp + "/tiny")
        for upcast in (True, False):
            row = first_micro_batch(model, upcast, options.bf16_autocast, os.path.join(tmp, str(upcast)))
            print(
                f"{upcast!s:>16} {row['lm_head_dtype']:>8} {row['max_abs_ratio_minus_1']:>13.3g} "
                f"{row['max_abs_old_minus_ref']:>13.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
