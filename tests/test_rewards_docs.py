"""Every Python example in docs/rewards.md runs (offline), except those marked as downloading a model."""

import re
from pathlib import Path

import pytest


DOC = Path(__file__).resolve().parents[1] / "docs" / "rewards.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
SKIP_MARK = "# (downloads a model"


def test_docs_have_examples():
    assert len(BLOCKS) >= 10
    assert sum(block.startswith(SKIP_MARK) for block in BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_example_runs(index, monkeypatch, tmp_path):
    block = BLOCKS[index]
    if block.startswith(SKIP_MARK):
        pytest.skip("downloads a model from the Hub")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{DOC.name}[block {index}]", "exec"), {"__name__": f"rewards_doc_{index}"})
