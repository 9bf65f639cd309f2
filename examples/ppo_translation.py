"""PPO + GAE that teaches a small instruct model to translate German to English, offline: SmolLM2-135M-Instruct with
LoRA (policy and critic adapters on one base) on the Ding dictionary's sentence pairs, rewarded with sentence BLEU.

    python examples/ppo_translation.py --config examples/ppo_translation.yaml
    python examples/ppo_translation.py --config examples/ppo_translation.yaml --total_episodes 64 --use_cpu true

Offline, `model_name_or_path: smollm2` and `dataset_name: ding` are the installed assets of `trl_gae_ext.assets`
(install lines there). One changed line each runs a hub model (`model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct`)
or a hub dataset with `translation: {"de": ..., "en": ...}` rows (`dataset_name: wmt/wmt16`, config `de-en`). The
held-out sentences are scored (mean sentence BLEU of greedy answers) before and after training.
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.assets import smollm2_path, translation_datasets, translation_prompt
from trl_gae_ext.rewards import BleuReward


OFFLINE_MODEL, OFFLINE_DATASET = "smollm2", "ding"


@dataclass
class ScriptArguments:
    dataset_name: str = field(default=OFFLINE_DATASET, metadata={"help": "'ding' (offline) or a hub id / directory."})
    dataset_config: str | None = field(default="de-en", metadata={"help": "Language pair config of a hub dataset."})
    source_lang: str = field(default="de")
    target_lang: str = field(default="en")
    num_heldout: int = field(default=200, metadata={"help": "Pairs held out of training and scored before/after."})


def to_row(row: dict, source: str, target: str) -> dict:
    pair = row["translation"]
    return {"prompt": translation_prompt(pair[source]), "reference": pair[target]}


def load_data(script_args: ScriptArguments):
    """`(train, heldout)` with a conversational `prompt` and a `reference` column."""
    if script_args.dataset_name == OFFLINE_DATASET:
        return translation_datasets(num_heldout=script_args.num_heldout)
    data = load_dataset(script_args.dataset_name, script_args.dataset_config, split="train")
    data = data.map(
        to_row, fn_kwargs={"source": script_args.source_lang, "target": script_args.target_lang},
        remove_columns=data.column_names,
    )  # fmt: skip
    split = data.train_test_split(test_size=script_args.num_heldout, seed=0)
    return split["train"], split["test"]


def main(argv: list[str] | None = None):
    parser = TrlParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model = model_args.model_name_or_path
    if model == OFFLINE_MODEL:
        model = smollm2_path()
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype}
    train, heldout = load_data(script_args)

    trainer = PPOTrainer(
        model=model,
        reward_funcs=BleuReward(),
        args=training_args,
        train_dataset=train,
        eval_dataset=heldout,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]
    print(f"held-out sentence BLEU (greedy, 0-1): {before:.4f} -> {after:.4f}")
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
