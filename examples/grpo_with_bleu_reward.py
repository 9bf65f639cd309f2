"""The BLEU reward adapter in TRL's own `GRPOTrainer`: no critic, group-relative advantages instead of GAE.

    python examples/grpo_with_bleu_reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --use_peft --lora_target_modules all-linear --learning_rate 1e-5 --num_generations 8 \
        --per_device_train_batch_size 8 --max_completion_length 128 --bf16 true --output_dir Qwen2.5-0.5B-GRPO-wmt16

`trl_gae_ext.rewards` are plain TRL reward functions, so the same `BleuReward()` (or `get_reward("chrf")`, ...) that
drives `PPOTrainer` drives `GRPOTrainer` and `RLOOTrainer` unchanged: compare PPO + GAE with GRPO on one task by
swapping the trainer.
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_gae_ext.rewards import BleuReward


LANGUAGES = {"de": "German", "en": "English", "fr": "French", "zh": "Chinese", "cs": "Czech", "ro": "Romanian"}


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="wmt/wmt16")
    dataset_config: str | None = field(default="de-en")
    dataset_train_split: str = field(default="train")
    source_lang: str = field(default="de")
    target_lang: str = field(default="en")
    max_train_samples: int | None = field(default=20_000)


def to_prompt(row: dict, source: str, target: str) -> dict:
    pair = row["translation"]
    instruction = f"Translate this {LANGUAGES.get(source, source)} text into {LANGUAGES.get(target, target)}."
    return {
        "prompt": [{"role": "user", "content": f"{instruction}\n\n{pair[source]}"}],
        "reference": pair[target],
    }


def main(argv: list[str] | None = None):
    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model_args.model_name_or_path = model_args.model_name_or_path or "Qwen/Qwen2.5-0.5B-Instruct"
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}

    dataset = load_dataset(script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.max_train_samples:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    dataset = dataset.map(
        to_prompt,
        fn_kwargs={"source": script_args.source_lang, "target": script_args.target_lang},
        remove_columns=dataset.column_names,
    )

    trainer = GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=BleuReward(),  # logged by GRPOTrainer as rewards/bleu/mean
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
    main()
