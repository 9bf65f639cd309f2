"""PPO + GAE with a learned reward model (a sequence-classification model) instead of a text metric: classic RLHF.

    python examples/ppo_reward_model.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --reward_model_name_or_path Skywork/Skywork-Reward-V2-Qwen3-0.6B --learning_rate 3e-6 \
        --per_device_train_batch_size 8 --num_mini_batches 2 --response_length 128 --kl_coef 0.05 \
        --missing_eos_penalty 1.0 --bf16 --output_dir Qwen2.5-0.5B-PPO-RM

The reward model scores `prompt + completion` (chat-templated with its own tokenizer when the prompts are chat
messages) through its `score` head, exactly as in TRL's `GRPOTrainer`. As in TRL's former PPO example, the critic
starts from the reward model (`--critic_from_reward_model`, default on): a separate sequence-classification critic
whose `score` head gives a value for every token; pass `--no_critic_from_reward_model` to use a value head on a copy
of the policy instead.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.cli_args import PPOArgumentParser
from trl_gae_ext.data import load_split, require_columns
from trl_gae_ext.errors import run_main


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="trl-lib/tldr", metadata={"help": "Needs a `prompt` column."})
    dataset_config: str | None = field(default=None)
    dataset_train_split: str = field(default="train")
    max_train_samples: int | None = field(default=20_000)
    reward_model_name_or_path: str = field(
        default="Skywork/Skywork-Reward-V2-Qwen3-0.6B", metadata={"help": "Sequence classification, num_labels=1."}
    )
    critic_from_reward_model: bool = field(default=True, metadata={"help": "Initialise the critic from the RM."})


def main(argv: list[str] | None = None):
    parser = PPOArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model_args.model_name_or_path = model_args.model_name_or_path or "Qwen/Qwen2.5-0.5B-Instruct"
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}

    # a hub id, a local .jsonl/.csv/.parquet file or directory, as `trl-gae ppo --dataset_name` takes
    dataset = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    fixes = {"prompt": "use a dataset with a `prompt` column (text or chat messages)"}
    require_columns(dataset, fixes, f"dataset {script_args.dataset_name!r}")
    if script_args.max_train_samples:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    dataset = dataset.select_columns(["prompt"])  # the reward model needs no reference

    reward_model = script_args.reward_model_name_or_path
    trainer = PPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_model,  # an id or path is loaded with AutoModelForSequenceClassification(num_labels=1)
        value_model=reward_model if script_args.critic_from_reward_model else None,
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
