"""`trl-gae`: argument parsing (YAML + flags), dataset loading, a real 2-iteration run, one-line errors, docs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trl_gae_ext import cli


ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _rows(n: int = 16, prompt: str = "prompt", reference: str = "reference") -> list[dict]:
    return [{prompt: f"say a word : {WORDS[i % 5]}", reference: f"the {WORDS[i % 5]}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl(tmp_path):
    return _write_jsonl(tmp_path / "train.jsonl", _rows())


def _tiny_run_flags(model_dir: str, dataset: str, output_dir: str) -> list[str]:
    # 8 prompts per rollout, 16 episodes: 2 PPO iterations of 2 optimizer steps
    return [
        "--model_name_or_path", model_dir, "--dataset_name", dataset, "--output_dir", output_dir,
        "--reward_funcs", "bleu", "--per_device_train_batch_size", "4", "--num_mini_batches", "2",
        "--num_ppo_epochs", "1", "--total_episodes", "16", "--response_length", "4", "--learning_rate", "1e-2",
        "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip


# -- parsing -------------------------------------------------------------------------------------------------------
def test_yaml_and_flags_fill_the_three_dataclasses(tmp_path):
    from trl import get_peft_config, get_quantization_config

    from trl_gae_ext import PPOConfig

    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: org/model\n"
        "dataset_name: data.jsonl\n"
        "prompt_column: question\n"
        "reward_funcs: [bleu, rougeL]\n"
        "reward_weights: [0.7, 0.3]\n"
        "kl_coef: 0.2\n"
        "lam: 0.9\n"
        "value_head: adapter\n"
        "use_peft: true\n"
        "lora_r: 32\n"
        "lora_target_modules: all-linear\n"
        "load_in_4bit: true\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    script, args, model = cli.parse_ppo_args(["--config", str(config), "--kl_coef", "0.05", "--lora_r", "8"])
    assert (script.dataset_name, script.prompt_column, script.reference_column) == (
        "data.jsonl",
        "question",
        "reference",
    )
    assert script.reward_funcs == ["bleu", "rougeL"]
    assert isinstance(args, PPOConfig)
    assert args.reward_weights == [0.7, 0.3]
    assert args.kl_coef == 0.05  # the flag overrides the file
    assert args.lam == 0.9 and args.value_head == "adapter"
    assert model.model_name_or_path == "org/model" and model.use_peft and model.load_in_4bit
    peft_config = get_peft_config(model)
    assert peft_config.r == 8 and peft_config.target_modules == "all-linear"
    assert get_quantization_config(model).load_in_4bit


@pytest.mark.parametrize(
    "argv, expected_debug, expected_rest",
    [
        (["ppo", "--debug"], True, ["ppo"]),
        (["ppo", "--debug", "--seed", "1"], True, ["ppo", "--seed", "1"]),
        (["ppo", "--debug", "underflow_overflow"], False, ["ppo", "--debug", "underflow_overflow"]),
    ],
)
def test_bare_debug_flag_is_ours_training_debug_option_is_not(argv, expected_debug, expected_rest, monkeypatch):
    monkeypatch.delenv("TRL_GAE_DEBUG", raising=False)
    assert cli.pop_debug(argv) == (expected_debug, expected_rest)


def test_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("ppo", "demo", "plan"):
        assert f"    {command} " in out


def test_plan_command_prints_the_planner_report(capsys):
    assert cli.main(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "peak:" in out


@pytest.mark.parametrize(
    "argv, size, seed, output_dir",
    [
        (["ppo"], "full", 0, "trl-gae-demo"),
        (["ppo", "--smoke", "--seed", "3", "--output_dir", "x"], "smoke", 3, "x"),
        (["demo", "--iterations", "5"], "full", 0, "trl-gae-demo"),
        (["ppo", "--output-dir", "y"], "full", 0, "y"),
    ],
)
def test_ppo_without_model_or_dataset_runs_the_demo(argv, size, seed, output_dir, monkeypatch):
    from trl_gae_ext import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert cli.main(argv) == 0
    (config,) = seen
    assert (config.size, config.seed, config.output_dir) == (size, seed, output_dir)
    if argv[0] == "demo":
        assert config.settings.iterations == 5


def test_dashed_training_flags_are_not_the_demo(capsys):
    assert cli.main(["ppo", "--model-name-or-path", "org/model"]) == 2
    assert "trl-gae ppo: error: no dataset given" in capsys.readouterr().err


# -- datasets ------------------------------------------------------------------------------------------------------
def _save_csv(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_csv(str(path / "train.csv"))
    return path / "train.csv"


def _save_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path / "train.parquet"))
    return path / "train.parquet"


def _save_json_array(path, rows):
    (path / "train.json").write_text(json.dumps(rows))
    return path / "train.json"


def _save_to_disk(path, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path / "saved"))
    return path / "saved"


def _save_dataset_to_disk(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path / "saved_ds"))
    return path / "saved_ds"


def _data_dir(path, rows):
    (path / "dir").mkdir()
    _write_jsonl(path / "dir" / "train.jsonl", rows)
    return path / "dir"


@pytest.mark.parametrize(
    "save",
    [_save_csv, _save_parquet, _save_json_array, _save_to_disk, _save_dataset_to_disk, _data_dir],
    ids=["csv", "parquet", "json", "save_to_disk-dict", "save_to_disk-dataset", "directory"],
)
def test_local_datasets_load_with_their_rows(save, tmp_path):
    rows = _rows(6)
    data = cli.load_any_dataset(str(save(tmp_path, rows)))
    train = cli.pick_split(data, "train", "x")
    assert train.num_rows == 6
    assert train[3] == rows[3]


# -- a real run ----------------------------------------------------------------------------------------------------
def test_ppo_on_a_local_model_and_jsonl_trains_two_iterations(tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "train.jsonl", _rows(prompt="question", reference="answer"))
    out = tmp_path / "out"
    argv = ["ppo", *_tiny_run_flags(tiny_model_dir, str(data), str(out))]
    argv += ["--prompt_column", "question", "--reference_column", "answer"]
    assert cli.main(argv) == 0
    assert "trained 2 PPO iterations" in capsys.readouterr().out
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy was updated
    assert (out / "critic" / "value_head.safetensors").is_file()


def test_console_script_runs_a_yaml_config(tiny_model_dir, tmp_path):
    # the script of the interpreter running the tests (CI's second environment has its own), else the one on PATH
    exe = shutil.which("trl-gae", path=os.path.dirname(sys.executable)) or shutil.which("trl-gae")
    assert exe is not None, "the trl-gae console script is not installed (pip install -e .)"
    data = _write_jsonl(tmp_path / "train.jsonl", _rows())
    flags = _tiny_run_flags(tiny_model_dir, str(data), str(tmp_path / "out"))
    settings = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}
    settings.update(reward_funcs="[bleu, rougeL]", save_strategy='"no"')
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [exe, "ppo", "--config", str(config), "--reward_weights", "0.5", "0.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 PPO iterations" in proc.stdout
    args = __import__("torch").load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert args.reward_weights == [0.5, 0.5] and args.response_length == 4


# -- one-line errors -----------------------------------------------------------------------------------------------
def _error_case(tmp_path, tiny_model_dir, jsonl, case):
    base = ["ppo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(jsonl), "--reward_funcs", "bleu"]
    base += ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    bad_file = tmp_path / "data.xlsx"
    bad_file.write_text("x")
    return {
        "unknown reward": base + ["--reward_funcs", "blue"],
        "unknown import path": base + ["--reward_funcs", "no_such_module.reward"],
        "missing dataset": [*base[:3], "--dataset_name", str(tmp_path / "nope.jsonl"), *base[5:]],
        "unsupported file": [*base[:3], "--dataset_name", str(bad_file), *base[5:]],
        "missing prompt column": base + ["--prompt_column", "question"],
        "missing reference column": base + ["--reference_column", "target"],
        "weights": base + ["--reward_weights", "1", "2"],
        "no reward": [a for a in base if a not in ("--reward_funcs", "bleu")],
        "missing model dir": [base[0], "--model_name_or_path", str(tmp_path / "no-model"), *base[3:]],
        "4bit without peft": base + ["--load_in_4bit"],
        "missing config": ["ppo", "--config", str(tmp_path / "missing.yaml")],
        "unknown flag": base + ["--learning_rat", "1e-3"],
        "demo flag": ["ppo", "--learning_rate", "1e-3"],
    }[case]


ERRORS = {
    "unknown reward": ("Unknown reward 'blue'. Valid names: bleu, rouge1", "--reward_funcs"),
    "unknown import path": ("cannot import reward function 'no_such_module.reward'", "importable"),
    "missing dataset": ("nope.jsonl': no such file or directory", ".jsonl"),
    "unsupported file": ("unsupported file type .xlsx", ".parquet"),
    "missing prompt column": ("has no prompt column 'question' (columns: prompt, reference)", "--prompt_column"),
    "missing reference column": ("has no reference column 'target'", "--reference_column"),
    "weights": ("--reward_weights has 2 values for 1 rewards", "one weight per reward"),
    "no reward": ("no reward given", "--reward_funcs"),
    "missing model dir": ("no-model: no such directory", "saved model directory"),
    "4bit without peft": ("a 4/8-bit base cannot be trained directly", "--use_peft"),
    "missing config": ("missing.yaml' not found", "--config"),
    "unknown flag": ("not used by the HfArgumentParser: ['--learning_rat', '1e-3']", "--help"),
    "demo flag": ("trl-gae ppo does not take --learning_rate 1e-3", "--model_name_or_path and --dataset_name"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gives_one_line_and_the_fix(case, tmp_path, tiny_model_dir, jsonl, capsys, monkeypatch):
    monkeypatch.delenv("TRL_GAE_DEBUG", raising=False)
    assert cli.main(_error_case(tmp_path, tiny_model_dir, jsonl, case)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("trl-gae", "  fix:"))]
    message, fix = ERRORS[case]
    assert len(lines) == 2, err
    assert lines[0].startswith("trl-gae ppo: error: ") and message in lines[0], err
    assert lines[1].startswith("  fix: ") and fix in lines[1], err
    assert "Traceback" not in err


def test_debug_raises_the_exception_instead(tmp_path, tiny_model_dir, jsonl, monkeypatch):
    monkeypatch.delenv("TRL_GAE_DEBUG", raising=False)
    with pytest.raises(cli.CLIError, match="Unknown reward 'blue'"):
        cli.main(_error_case(tmp_path, tiny_model_dir, jsonl, "unknown reward") + ["--debug"])


def test_unknown_command(capsys):
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


# -- docs ----------------------------------------------------------------------------------------------------------
def test_configuration_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    for field in ("kl_coef", "lam", "value_head", "reward_funcs", "prompt_column", "load_in_4bit"):
        assert f"| `{field}` |" in text
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == text, "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
