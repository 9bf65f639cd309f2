"""`log_completions=True`: the completion samples reach the trackers that show tables (wandb here, offline), as a
`completions` table with TRL's GRPOTrainer columns, one row per sampled completion."""

import glob
import json

import pytest
from conftest import make_prompts, offline_args


def test_completions_table_has_one_row_per_sample_in_trls_columns():
    from trl_gae_ext.completions import completions_table

    samples = {"prompt": ["p1", "p2"], "completion": ["a b", ""], "scores": [0.5, -1]}
    assert completions_table(samples, step=7) == {
        "step": [7, 7],
        "prompt": ["p1", "p2"],
        "completion": ["a b", ""],
        "score": [0.5, -1.0],
    }


def _length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_wandb_offline_run_gets_a_completions_table_per_rollout(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from datasets import Dataset

    from trl_gae_ext import PPOTrainer
    from trl_gae_ext.tiny import build_tiny_model

    for name in ("WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # writes the run under WANDB_DIR, no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = make_prompts(8)
    args = offline_args(
        tmp_path, report_to=["wandb"], per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=8, response_length=3, logging_steps=1, log_completions=True, num_completions_to_print=1,
    )  # fmt: skip
    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2)
    trainer = PPOTrainer(model, _length, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.end()  # finishes the wandb run

    paths = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json")))
    tables = [json.loads(open(p).read()) for p in paths]
    assert len(tables) == 2  # 2 rollouts of 4 episodes, one log each
    assert all(t["columns"] == ["step", "prompt", "completion", "score"] for t in tables)
    rows = [row for t in tables for row in t["data"]]
    assert sorted({row[0] for row in rows}) == [1, 2]  # the trainer's global step of each rollout
    assert len(rows) == 8 and {row[1] for row in rows} <= set(prompts)
    assert all(row[3] == len(row[2]) for row in rows)  # the score the reward gave that very completion
