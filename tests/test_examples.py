"""Every example runs offline: the tiny model from conftest stands in for the hub model, small local datasets (laid
out like the hub ones: README configs, same columns) for the hub datasets, and a few episodes for the real budget."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_gae_ext import cli


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

# 2 prompts x 2 minibatches = 4 episodes per iteration, 8 episodes = 2 PPO iterations of 2 optimizer steps
TINY_PPO = [
    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_mini_batches", "2",
    "--num_ppo_epochs", "1", "--total_episodes", "8", "--response_length", "4", "--max_prompt_length", "48",
    "--learning_rate", "1e-3", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--report_to", "none",
    "--save_strategy", "no", "--disable_tqdm", "true", "--log_completions", "false", "--warmup_steps", "0",
]  # fmt: skip


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hub_like_dataset(root: Path, config: str | None, rows: list[dict]) -> str:
    """A local dataset directory; with `config`, a README declares it as the hub repo does (`load_dataset(dir, config)`)."""
    data_dir = root / (config or "data")
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        card = {
            "configs": [{"config_name": config, "data_files": [{"split": "train", "path": f"{config}/train.jsonl"}]}]
        }
        (root / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    return str(root)


@pytest.fixture(scope="module")
def wmt(tmp_path_factory):
    rows = [{"translation": {"de": f"hallo {w}", "en": f"the {w}"}} for w in WORDS]
    return _hub_like_dataset(tmp_path_factory.mktemp("wmt16"), "de-en", rows)


@pytest.fixture(scope="module")
def tldr(tmp_path_factory):
    rows = [{"prompt": f"say a word : {w}", "completion": f"the {w}"} for w in WORDS]
    return _hub_like_dataset(tmp_path_factory.mktemp("tldr"), None, rows)


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_ppo_bleu_translation_with_its_yaml(tiny_model_dir, wmt, tmp_path):
    example = _load("ppo_bleu_translation")
    argv = ["--config", str(EXAMPLES / "ppo_bleu_translation.yaml"), "--model_name_or_path", tiny_model_dir]
    argv += ["--dataset_name", wmt, "--output_dir", str(tmp_path), *TINY_PPO, "--logging_steps", "2"]
    trainer = example.main(argv)
    row = trainer.train_dataset[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("hallo alpha")
    assert "German" in row["prompt"][0]["content"] and row["reference"] == "the alpha"
    assert len(_logged(trainer, "rewards/bleu/mean")) == 2
    assert trainer.args.value_head == "adapter" and trainer.args.kl_coef == 0.05  # from the YAML
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "critic" / "adapter_model.safetensors").is_file()


def test_ppo_rouge_summarization(tiny_model_dir, tmp_path):
    rows = [{"article": f"{w} " * 50 + "end", "highlights": f"the {w}"} for w in WORDS]
    data = _hub_like_dataset(tmp_path / "cnn", "3.0.0", rows)
    example = _load("ppo_rouge_summarization")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--max_article_words", "5"]
    argv += ["--output_dir", str(tmp_path / "out"), *TINY_PPO, "--logging_steps", "2"]
    trainer = example.main(argv)
    content = trainer.train_dataset[0]["prompt"][0]["content"]
    assert content.endswith("\n\nalpha alpha alpha alpha alpha")  # cut to 5 words before templating
    assert len(_logged(trainer, "rewards/rougeL/mean")) == 2


def test_custom_reward_function_values():
    reward = _load("ppo_custom_reward").concise_summary
    ten = " ".join(f"w{i}" for i in range(10))
    loop = "a b c a b c d e f g h"
    chat = [{"role": "assistant", "content": ten}]
    # 10 words: in range; 6 words: (6 - 4) / 4; a repeated trigram costs 0.5; 60 words: 1 - 30 / 30
    sixty = " ".join(f"w{i}" for i in range(60))
    assert reward(None, [ten, "a b c d e f", loop, sixty, chat], None) == [1.0, 0.5, 0.5, 0.0, 1.0]


def test_ppo_custom_reward(tiny_model_dir, tldr, tmp_path):
    example = _load("ppo_custom_reward")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", tldr, "--output_dir", str(tmp_path)]
    argv += [*TINY_PPO, "--reward_weights", "1.0", "0.5", "--logging_steps", "2"]
    trainer = example.main(argv)
    assert len(_logged(trainer, "rewards/concise_summary/mean")) == 2
    assert len(_logged(trainer, "rewards/rougeL/mean")) == 2
    assert trainer.reward_weights.tolist() == [1.0, 0.5]


def test_ppo_reward_model_also_initialises_the_critic(tokenizer, tiny_model_dir, tldr, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from trl_gae_ext.tiny import build_tiny_model

    reward_dir = tmp_path / "tiny-rm"
    rm = build_tiny_model(tokenizer, hidden_size=16, num_attention_heads=2, seed=1, num_labels=1,
                          model_class=AutoModelForSequenceClassification)  # fmt: skip
    rm.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    example = _load("ppo_reward_model")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", tldr, "--output_dir", str(tmp_path / "out")]
    argv += ["--reward_model_name_or_path", str(reward_dir), *TINY_PPO, "--logging_steps", "2"]
    trainer = example.main(argv)
    assert trainer.train_dataset.column_names == ["prompt"]
    (name,) = trainer.reward_func_names
    assert len(_logged(trainer, f"rewards/{name}/mean")) == 2
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert wrapper.layout == "separate" and wrapper.critic.config.hidden_size == 16  # the reward model's backbone


def test_grpo_with_bleu_reward(tiny_model_dir, wmt, tmp_path):
    example = _load("grpo_with_bleu_reward")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", wmt, "--output_dir", str(tmp_path)]
    argv += ["--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4"]
    argv += ["--max_steps", "1", "--logging_steps", "1", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    argv += ["--save_strategy", "no", "--disable_tqdm", "true", "--activation_checkpointing", "false"]
    trainer = example.main(argv)
    assert trainer.state.global_step == 1
    assert len(_logged(trainer, "rewards/bleu/mean")) == 1


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


JSONL_ROWS = {
    "translation": [{"translation": {"de": f"hallo {w}", "en": f"the {w}"}} for w in WORDS],
    "summaries": [{"article": f"{w} " * 20, "highlights": f"the {w}"} for w in WORDS],
    "tldr": [{"prompt": f"say a word : {w}", "completion": f"the {w}"} for w in WORDS],
}
PPO_EXAMPLES = {
    "ppo_bleu_translation": ("translation", "rewards/bleu/mean"),
    "ppo_rouge_summarization": ("summaries", "rewards/rougeL/mean"),
    "ppo_custom_reward": ("tldr", "rewards/concise_summary/mean"),
}


@pytest.mark.parametrize("name", list(PPO_EXAMPLES))
def test_examples_read_a_local_jsonl_file_as_the_cli_does(name, tiny_model_dir, tmp_path):
    rows, metric = PPO_EXAMPLES[name]
    data = _jsonl(tmp_path / "train.jsonl", JSONL_ROWS[rows])
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", str(tmp_path / "out")]
    trainer = _load(name).main([*argv, *TINY_PPO, "--total_episodes", "4", "--logging_steps", "2"])
    assert trainer.train_dataset.num_rows == len(WORDS)  # every row of the file, as the train split
    assert len(_logged(trainer, metric)) == 1


EXAMPLE_NAMES = [*PPO_EXAMPLES, "ppo_reward_model", "grpo_with_bleu_reward"]


def _bad_example_input(case: str, tmp_path: Path) -> tuple[list[str], str, str]:
    """argv, the text of the error line and of its fix."""
    config = tmp_path / "run.yaml"
    if case == "yaml type":
        config.write_text("per_device_train_batch_size: eight\n")
        return ["--config", str(config)], "per_device_train_batch_size: 'eight' in", "per_device_train_batch_size: 8"
    if case == "missing file":
        missing = str(tmp_path / "nope.jsonl")
        return ["--dataset_name", missing], "nope.jsonl': no such file or directory", ".jsonl"
    data = _jsonl(tmp_path / "other.jsonl", [{"text": "x"}])
    return ["--dataset_name", data], "has no column", ""


@pytest.mark.parametrize("case", ["yaml type", "missing file", "missing column"])
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_report_user_errors_in_one_line(name, case, tmp_path, capsys, monkeypatch):
    from trl_gae_ext.errors import run_main

    monkeypatch.delenv("TRL_GAE_DEBUG", raising=False)
    example = _load(name)
    argv, message, fix = _bad_example_input(case, tmp_path)
    argv += ["--output_dir", str(tmp_path / "out"), "--bf16", "false"]  # GRPOConfig's default bf16 needs a GPU
    assert run_main(lambda: example.main(argv), prog=f"{name}.py") == 2  # what `python examples/<name>.py` runs
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{name}.py: error: "), lines
    error, _, advice = lines[0].partition("; fix: ")
    assert message in error and fix in advice, lines[0]


def test_example_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "ppo_custom_reward.py"), "--dataset_name", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        # the package of this checkout, wherever the installed one lives
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "HF_HUB_OFFLINE": "1", "TRL_GAE_DEBUG": "0"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("ppo_custom_reward.py: error: cannot read dataset"), lines


QLORA = EXAMPLES / "qlora_7b_24gb.yaml"


def test_qlora_recipe_parses_into_the_consumer_gpu_settings():
    script, args, model = cli.parse_ppo_args(["--config", str(QLORA), "--use_cpu", "true"])  # bf16 needs a GPU else
    assert model.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct" and model.load_in_4bit and model.use_peft
    assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant and model.dtype == "bfloat16"
    assert model.lora_target_modules == "all-linear"
    assert args.value_head == "adapter" and args.activation_checkpointing and args.bf16
    assert script.reward_funcs == ["rougeL"] and script.reference_column == "completion"


def test_qlora_recipe_comment_matches_the_planner(capsys):
    text = QLORA.read_text()
    command = re.search(r"#   trl-gae plan (.*?)\n#   -> peak ([\d.]+) GiB", text.replace("\\\n#      ", ""), re.S)
    assert command, "the YAML should quote its `trl-gae plan` command and the peak it printed"
    assert cli.main(["plan", *command.group(1).split()]) == 0
    report = capsys.readouterr().out
    peak = float(re.search(r"peak: ([\d.]+) GiB .*fits in 24 GiB", report).group(1))
    assert abs(peak - float(command.group(2))) < 1.5, f"planner now says {peak} GiB: update the comment"


def test_qlora_recipe_runs_4bit_on_the_tiny_model(tiny_model_dir, tldr, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from trl_gae_ext.trainer import PPOTrainer

    trainers = []
    end = PPOTrainer.end
    monkeypatch.setattr(PPOTrainer, "end", lambda self: (trainers.append(self), end(self)))
    out = tmp_path / "out"
    overrides = ["--model_name_or_path", tiny_model_dir, "--dataset_name", tldr, "--output_dir", str(out)]
    overrides += [*TINY_PPO, "--local_rollout_forward_batch_size", "4", "--logging_steps", "2"]
    assert cli.main(["ppo", "--config", str(QLORA), *overrides]) == 0
    (trainer,) = trainers
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    assert any(type(m).__name__ == "Linear4bit" for m in policy.modules())  # really NF4 on the CPU
    assert trainer.state.global_step == 2 * trainer.args.steps_per_rollout
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "critic" / "critic_layout.json").read_text())["layout"] == "adapter"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize("name", ["deepspeed_zero2", "multi_gpu"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / f"{name}.yaml"))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "deepspeed_zero2":
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 2
    else:
        assert config.distributed_type == "MULTI_GPU"


def test_multi_gpu_guide_points_at_existing_files_and_modules():
    text = (EXAMPLES / "multi_gpu.md").read_text()
    for path in re.findall(r"examples/[\w./-]+\.(?:py|yaml)", text):
        assert (EXAMPLES.parent / path).is_file(), path
    for link in re.findall(r"\]\(([\w./-]+)\)", text):
        if not link.startswith("http"):
            assert (EXAMPLES / link).is_file(), link
    assert "-m trl_gae_ext.cli ppo" in text
    # `python -m trl_gae_ext.cli` is what `accelerate launch -m` runs
    proc = subprocess.run([sys.executable, "-m", "trl_gae_ext.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ppo" in proc.stdout
