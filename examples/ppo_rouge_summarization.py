"""PPO + GAE on news summarization, rewarded with ROUGE-L F1 against the reference highlights.

    python examples/ppo_rouge_summarization.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --use_peft --lora_target_modules all-linear \
        --value_head adapter --learning_rate 1e-5 --per_device_train_batch_size 4 --num_mini_batches 2 \
        --response_length 96 --kl_coef 0.05 --bf16 --total_episodes 20000 --output_dir Qwen2.5-0.5B-PPO-cnn

Dataset: CNN/DailyMail 3.0.0 (`article`, `highlights`). Articles are cut to `max_article_words` words *before*
templating, because the trainer truncates long prompts on the left and would drop the instruction.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_gae_ext import PPOConfig, PPOTrainer
from trl_gae_ext.cli_args import PPOArgumentParser
from trl_gae_ext.data import load_split, require_columns
from trl_gae_ext.errors import run_main
from trl_gae_ext.rewards import RougeReward


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="abisee/cnn_dailymail")
    dataset_config: str | None = field(default="3.0.0")
    dataset_train_split: str = field(default="train")
    document_column: str = field(default="article")
    summary_column: str = field(default="highlights")
    max_article_words: int = field(default=400)
    max_train_samples: int | None = field(default=20_000)
    rouge_type: str = field(default="rougeL", metadata={"help": "rouge1, rouge2, rougeL or rougeLsum"})


def to_prompt(row: dict, document: str, summary: str, max_words: int) -> dict:
    article = " ".join(row[document].split()[:max_words])
    return {
        "prompt": [
            {"role": "user", "content": f"Summarize this news article in two or three sentences.\n\n{article}"}
        ],
        "reference": row[summary],
    }


def main(argv: list[str] | None = None):
    parser = PPOArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model_args.model_name_or_path = model_args.model_name_or_path or "Qwen/Qwen2.5-0.5B-Instruct"
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}

    # a hub id, a local .jsonl/.csv/.parquet file or directory, as `trl-gae ppo --dataset_name` takes
    dataset = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    fixes = {
        script_args.document_column: "pass --document_column <the column holding the articles>",
        script_args.summary_column: "pass --summary_column <the column holding the reference summaries>",
    }
    require_columns(dataset, fixes, f"dataset {script_args.dataset_name!r}")
    if script_args.max_train_samples:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    dataset = dataset.map(
        to_prompt,
        fn_kwargs={
            "document": script_args.document_column,
            "summary": script_args.summary_column,
            "max_words": script_args.max_article_words,
        },
        remove_columns=dataset.column_names,
    )

    trainer = PPOTrainer(
        model=model_args.model_name_or_path,
        # F-measure of the longest common subsequence; `measure="r"` rewards recall (longer summaries)
        reward_funcs=RougeReward(rouge_type=script_args.rouge_type),
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
