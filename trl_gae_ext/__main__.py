"""`python -m trl_gae_ext`: a one-minute offline PPO+GAE run on a tiny model built in-process.

Task: answer `spell : <digit>` with the digit's English word, rewarded by `TokenF1Reward` against a `reference`
column. Prints the greedy reward before and after training. (`trl-gae ppo`, the full demo, comes with the CLI.)
"""

import logging
import os


WORDS = "zero one two three four five six seven eight nine".split()


def main(total_episodes: int = 960, output_dir: str = "./trl-gae-quick-demo") -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset

    from trl_gae_ext import PPOConfig, PPOTrainer
    from trl_gae_ext.rewards import TokenF1Reward
    from trl_gae_ext.tiny import build_tiny_model, build_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    prompts = [f"spell : {d}" for d in range(10)]
    data = Dataset.from_dict({"prompt": prompts * 8, "reference": WORDS * 8})
    tokenizer = build_tokenizer(prompts + WORDS)
    model = build_tiny_model(tokenizer, hidden_size=64, num_attention_heads=4, seed=0)
    args = PPOConfig(
        output_dir=output_dir, per_device_train_batch_size=16, num_mini_batches=1, num_ppo_epochs=4,
        response_length=3, total_episodes=total_episodes, learning_rate=5e-3, kl_coef=0.0, temperature=1.0,
        report_to="none", save_strategy="no", logging_steps=8, use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = PPOTrainer(model, TokenF1Reward(), args=args, train_dataset=data,
                         eval_dataset=data.select(range(10)), processing_class=tokenizer)  # fmt: skip
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]
    print(f"greedy token-F1 reward on the 10 prompts: {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
