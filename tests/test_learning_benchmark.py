"""benchmarks/learning.py: equal completion budgets across PPO, GRPO and RLOO, and its measurements checked against
closed forms (KL of a model to itself, linear interpolation of the reach point)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("benchmark_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_completions_to_reach_interpolates_between_evaluations(learning):
    curve = [(0, 30.0), (640, 50.0), (1280, 70.0), (1920, 90.0)]
    assert learning.completions_to_reach(curve, 60.0) == pytest.approx(960.0)
    assert learning.completions_to_reach(curve, 70.0) == pytest.approx(1280.0)
    assert learning.completions_to_reach(curve, 20.0) == 0.0  # already there at the start
    assert learning.completions_to_reach(curve, 95.0) is None
    # a curve that dips below the target again still counts the first crossing
    assert learning.completions_to_reach([(0, 10.0), (64, 80.0), (128, 40.0)], 45.0) == pytest.approx(64 * 35 / 70)


def test_kl_to_start_is_zero_for_the_same_model_and_positive_otherwise(learning, tokenizer):
    from trl_gae_ext.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=0)
    other = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=1)
    model.train()
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    assert learning.kl_to_start(model, model, tokenizer, prompts, max_new_tokens=5, seed=0) == pytest.approx(
        0, abs=1e-6
    )
    kl = learning.kl_to_start(model, other, tokenizer, prompts, max_new_tokens=5, seed=0)
    assert kl > 0.01
    # the same seed samples the same responses: the estimate is reproducible
    assert learning.kl_to_start(model, other, tokenizer, prompts, max_new_tokens=5, seed=0) == pytest.approx(kl)
    assert model.training  # it restored the mode it found


def test_quick_run_gives_every_method_the_same_completions(learning, tmp_path):
    out = tmp_path / "out"
    rows = learning.main(["--quick", "--jobs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert set(rows) == set(learning.QUICK_METHODS)
    runs = {m: json.loads((out / "runs" / f"{m}-seed0.json").read_text()) for m in learning.QUICK_METHODS}
    budget = 2 * learning.COMPLETIONS_PER_BATCH
    for run in runs.values():
        # evaluated before training and after each batch; the reward function counted every generated completion
        assert [r["completions"] for r in run["records"]] == [0, budget // 2, budget]
        assert [r["batch"] for r in run["records"]] == [0, 1, 2]
        for record in run["records"]:
            assert 0.0 <= record["bleu"] <= 100.0 and 0.0 <= record["exact_match"] <= 100.0
            assert record["kl"] >= -1e-6  # exact per-token KL summed: never negative
        assert run["records"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # before training the policy is the start
        assert run["records"][-1]["kl"] > 0.0  # and training moved it
    # every method started from the same warm start
    assert len({run["records"][0]["bleu"] for run in runs.values()}) == 1
    table = (out / "learning.md").read_text()
    for m in learning.QUICK_METHODS:
        assert learning.METHODS[m].label in table
    assert (out / "learning.png").stat().st_size > 10_000
    # the reach column is measured against the GRPO run's final seed-mean BLEU
    assert rows["ppo"]["target"] == {"method": "grpo-g4", "bleu": runs["grpo-g4"]["records"][-1]["bleu"]}
