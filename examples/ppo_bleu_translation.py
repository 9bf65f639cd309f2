"""PPO + GAE on translation prompts, rewarded with sentence BLEU against the reference translation.

    python examples/ppo_bleu_translation.py --config examples/ppo_bleu_translation.yaml
    python examples/ppo_bleu_translation.py --config examples/ppo_bleu_translation.yaml --kl_coef 0.1  # flags win

The dataset is WMT16 de-en (`translation: {"de": ..., "en": ...}` rows); `to_prompt` turns a row into a chat prompt
and a `reference` column, which `BleuReward` reads. Any `translation`-style dataset works, local ones too: a .jsonl
(.json/.csv/.parquet) file of such rows, a directory with a README declaring the `de-en` config, or a plain directory
of jsonl files with `--dataset_config` unset; `--dataset_name` takes what `trl-gae ppo --dataset_name` takes.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.cli_args import PPOArgumentParser
from trl_gae_ext.data import load_split, require_columns
from trl_gae_ext.errors import run_main
from trl_gae_ext.rewards import BleuReward


LANGUAGES = {"de": "German", "en": "English", "fr": "French", "zh": "Chinese", "cs": "Czech", "ro": "Romanian"}


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="wmt/wmt16", metadata={"help": "Hub id or local directory."})
    dataset_config: str | None = field(default="de-en", metadata={"help": "Language pair config, e.g. de-en."})
    dataset_train_split: str = field(default="train")
    source_lang: str = field(default="de")
    target_lang: str = field(default="en")
    max_train_samples: int | None = field(default=20_000, metadata={"help": "First N pairs only (WMT is large)."})


def to_prompt(row: dict, source: str, target: str) -> dict:
    pair = row["translation"]
    instruction = f"Translate this {LANGUAGES.get(source, source)} text into {LANGUAGES.get(target, target)}."
    return {
        "prompt": [{"role": "user", "content": f"{instruction}\n\n{pair[source]}"}],
        "reference": pair[target],
    }


def main(argv: list[str] | None = None):
    parser = PPOArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}

    # a hub id, a local .jsonl/.csv/.parquet file or directory, as `trl-gae ppo --dataset_name` takes
    dataset = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    what = f"dataset {script_args.dataset_name!r}"
    require_columns(dataset, {"translation": "use a dataset laid out like WMT: translation: {de: ..., en: ...}"}, what)
    if script_args.max_train_samples:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    dataset = dataset.map(
        to_prompt,
        fn_kwargs={"source": script_args.source_lang, "target": script_args.target_lang},
        remove_columns=dataset.column_names,
    )

    trainer = PPOTrainer(
        model=model_args.model_name_or_path,
        # sacrebleu's 13a tokenizer, or its zh tokenizer when the text holds Chinese characters ("auto")
        reward_funcs=BleuReward(tokenize="auto"),
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
