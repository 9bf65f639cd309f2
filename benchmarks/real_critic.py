"""The critic alone on a real model: `val/explained_var` per rollout of PPO's critic on SmolLM2-135M-Instruct.

    python benchmarks/real_critic.py new                                           # the package's defaults
    python benchmarks/real_critic.py old '{"value_head_init_std": null, "value_head_return_scale": false}'

The policy stays frozen (`critic_warmup_steps` covers every iteration), so every configuration sees the same
rollouts (seed 0) and only the critic differs: German -> English on the Ding pairs (`trl_gae_ext.assets`), BLEU
reward, LoRA r 16 on every linear layer with the `adapter` critic, 16 episodes per rollout, 2 epochs x 2 minibatches,
lr 2e-4, kl_coef 0.05, at most 32 new tokens. The JSON argument overrides `PPOConfig` fields. Prints one line per
rollout (explained variance, mean value, mean return, value clip fraction). Results: docs/learning.md.
"""

import argparse
import json
import time

import torch
from peft import LoraConfig
from transformers import PrinterCallback, TrainerCallback

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.assets import smollm2_path, translation_datasets
from trl_gae_ext.rewards import BleuReward


KEYS = ("val/explained_var", "val/value_mean", "val/returns_mean", "objective/scores")


class CriticLog(TrainerCallback):
    def __init__(self, name: str):
        self.name, self.rows, self.start = name, [], time.perf_counter()

    def on_rollout_end(self, args, state, control, stats=None, **kwargs):
        self.rows.append({k: round(stats[k], 4) for k in KEYS})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "val/clipfrac_avg" in logs and self.rows:
            self.rows[-1]["val/clipfrac_avg"] = round(logs["val/clipfrac_avg"], 3)
            seconds = round(time.perf_counter() - self.start)
            print(self.name, len(self.rows) - 1, self.rows[-1], f"{seconds} s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON object of PPOConfig fields")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", default="/tmp/real_critic")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, _ = translation_datasets(num_train=16 * args.iterations)
    config = dict(
        output_dir=f"{args.out}/{args.name}", per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
        response_length=32, total_episodes=16 * args.iterations, learning_rate=2e-4, kl_coef=0.05,
        value_head="adapter", report_to="none", save_strategy="no", logging_steps=4, use_cpu=True, disable_tqdm=True,
        seed=0, critic_warmup_steps=args.iterations,
    )  # fmt: skip
    config.update(json.loads(args.overrides))
    log = CriticLog(args.name)
    trainer = PPOTrainer(
        smollm2_path(), BleuReward(), args=PPOConfig(**config), train_dataset=train, callbacks=[log],
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return log.rows


if __name__ == "__main__":
    main()
