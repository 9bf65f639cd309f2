"""PPO + GAE with your own Python reward function, mixed with a metric reward.

    python examples/ppo_custom_reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --use_peft --lora_target_modules all-linear --value_head adapter --learning_rate 1e-5 \
        --response_length 64 --reward_weights 1.0 0.5 --bf16 --output_dir Qwen2.5-0.5B-PPO-tldr

A reward function is any callable `(prompts, completions, **kwargs) -> list[float]`, exactly as in TRL's
`GRPOTrainer`: `completions` are strings (or lists of chat messages for chat prompts), every dataset column except
`prompt` arrives as a keyword list (here `completion`, TL;DR's reference summary), and `completion_ids` holds the
token ids. Return `None` for a sample to skip it. Its `__name__` names the logged metric `rewards/<name>/mean`.

The same function works from the command line: `trl-gae ppo ... --reward_funcs my_module.concise_summary rougeL`.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.cli_args import PPOArgumentParser
from trl_gae_ext.data import load_split, require_columns
from trl_gae_ext.errors import run_main
from trl_gae_ext.rewards import get_reward


def concise_summary(prompts, completions, completion_ids, target_words=(8, 30), **kwargs) -> list[float]:
    """1.0 for a summary of 8-30 words, falling linearly to 0 at half / twice those lengths; -0.5 when it
    repeats a word trigram (a typical degenerate loop)."""
    low, high = target_words
    rewards = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = text.split()
        n = len(words)
        if n < low:
            score = max(0.0, (n - low / 2) / (low / 2))
        elif n > high:
            score = max(0.0, 1.0 - (n - high) / high)
        else:
            score = 1.0
        trigrams = [tuple(words[i : i + 3]) for i in range(max(0, n - 2))]
        if len(trigrams) != len(set(trigrams)):
            score -= 0.5
        rewards.append(score)
    return rewards


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="trl-lib/tldr", metadata={"help": "Needs `prompt` and `completion` columns."})
    dataset_config: str | None = field(default=None)
    dataset_train_split: str = field(default="train")
    max_train_samples: int | None = field(default=20_000)


def main(argv: list[str] | None = None):
    parser = PPOArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model_args.model_name_or_path = model_args.model_name_or_path or "Qwen/Qwen2.5-0.5B-Instruct"
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}

    # a hub id, a local .jsonl/.csv/.parquet file or directory, as `trl-gae ppo --dataset_name` takes
    dataset = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    fixes = {
        "prompt": "use a dataset with a `prompt` column (text or chat messages)",
        "completion": "the rougeL reward reads the reference summary from a `completion` column: add one",
    }
    require_columns(dataset, fixes, f"dataset {script_args.dataset_name!r}")
    if script_args.max_train_samples:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))

    trainer = PPOTrainer(
        model=model_args.model_name_or_path,
        # weighted by --reward_weights (default 1.0 each): length/loop shaping + overlap with the reference summary
        reward_funcs=[concise_summary, get_reward("rougeL", reference_column="completion")],
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.end()
    return trainer


if __name__ == "__main__":
    sys.exit(run_main(main))  # a user error is one line (TRL_GAE_DEBUG=1 shows the traceback)
