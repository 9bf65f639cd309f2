"""Started twice by test_distributed.py (RANK/WORLD_SIZE/MASTER_* set, as torchrun sets them): two CPU processes (gloo)
train PPO together and each writes what it saw to rank<N>.json."""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from conftest import CORPUS, make_prompts  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_gae_ext import PPOConfig, PPOTrainer  # noqa: E402
from trl_gae_ext.tiny import build_tiny_model, build_tokenizer  # noqa: E402


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def main(out_dir: str) -> None:
    tokenizer = build_tokenizer(CORPUS)
    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=0)
    seen_prompts = []

    def reward(prompts, completions, **kwargs):
        seen_prompts.extend(prompts)
        return length_reward(prompts, completions)

    args = PPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=4,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=5,
        total_episodes=16,
        learning_rate=1e-3,
        temperature=1.0,
        ddp_backend="gloo",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = PPOTrainer(
        model, reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(16)}),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    rollout = trainer._rollout
    mask = rollout.response_mask.double()
    adv = rollout.advantages.double()
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    checksum = sum(float(p.detach().double().sum()) for p in wrapper.parameters())
    result = {
        "rank": trainer.args.process_index,
        "world_size": trainer.accelerator.num_processes,
        "adv_sum": float((adv * mask).sum()),
        "adv_sq_sum": float((adv**2 * mask).sum()),
        "count": float(mask.sum()),
        "checksum": checksum,
        "prompts": seen_prompts,
        "logged_episode": [h["episode"] for h in trainer.state.log_history if "episode" in h],
    }
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    # Leave before the trainer is freed. Freeing DDP's reducer destroys the gloo process group, which joins its worker
    # thread while holding the GIL; that thread may still need the GIL to free a finished allgather's tensors. About
    # one run in six deadlocked there (py-spy, torch 2.13), after the results above were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
