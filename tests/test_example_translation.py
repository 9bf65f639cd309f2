"""examples/ppo_translation.py runs with the hub-dataset line changed (a local directory laid out like WMT16) and
the tiny model in place of SmolLM2; its offline defaults are the installed assets of `trl_gae_ext.assets`."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from test_examples import TINY_PPO, WORDS, _hub_like_dataset

from trl_gae_ext.assets import translation_prompt


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_translation.py"


def _load():
    spec = importlib.util.spec_from_file_location("example_ppo_translation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_defaults_are_the_offline_assets():
    config = yaml.safe_load(EXAMPLE.with_suffix(".yaml").read_text())
    example = _load()
    assert config["model_name_or_path"] == example.OFFLINE_MODEL
    assert config["dataset_name"] == example.OFFLINE_DATASET
    assert config["value_head"] == "adapter" and config["use_peft"] is True


def test_hub_dataset_layout_trains_and_scores_the_heldout_pairs(tiny_model_dir, tmp_path, capsys):
    rows = [{"translation": {"de": f"hallo {w}", "en": f"the {w}"}} for w in WORDS]
    wmt = _hub_like_dataset(tmp_path / "wmt16", "de-en", rows)
    argv = ["--config", str(EXAMPLE.with_suffix(".yaml")), "--model_name_or_path", tiny_model_dir]
    argv += ["--dataset_name", wmt, "--num_heldout", "2", "--output_dir", str(tmp_path / "out"), *TINY_PPO]
    trainer = _load().main(argv)
    assert len(trainer.train_dataset) == len(WORDS) - 2 and len(trainer.eval_dataset) == 2
    held_out = set(trainer.eval_dataset["reference"])
    assert not held_out & set(trainer.train_dataset["reference"])  # never trained on
    row = trainer.train_dataset[0]
    assert row["prompt"] == translation_prompt("hallo " + row["reference"].split()[-1])
    # scored before and after training (`train()` starts a new log history, so the line printed says both)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("held-out sentence BLEU"))
    before, after = (float(x) for x in line.split(": ")[1].split(" -> "))
    assert 0 <= before <= 1 and 0 <= after <= 1
    logged = [h["eval_reward"] for h in trainer.state.log_history if "eval_reward" in h]
    assert after == pytest.approx(logged[-1], abs=1e-4)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "critic" / "adapter_model.safetensors").is_file()
