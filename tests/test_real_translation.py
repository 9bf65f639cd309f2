"""benchmarks/real_translation.py: its measurements checked against closed forms on tiny models, and its `--quick`
run on SmolLM2 and the Ding pairs (slow; skipped where the offline assets are absent): every method generates the
same number of completions and is scored on the same held-out pairs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_gae_ext.assets import missing_assets
from trl_gae_ext.tiny import build_tiny_model


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_translation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_real_translation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_translation_scores_of_exact_and_empty_outputs(bench):
    refs = ["the cat sat on the mat .", "a dog barked at the moon ."]
    exact = bench.translation_scores(refs, refs)
    assert exact["bleu"] == pytest.approx(100.0) and exact["chrf"] == pytest.approx(100.0)
    assert exact["length_ratio"] == pytest.approx(1.0)
    half = bench.translation_scores(["the cat sat", "a dog barked"], refs)
    assert half["length_ratio"] == pytest.approx(6 / 14)  # 13a tokens: 3 + 3 of 7 + 7


def test_kl_to_the_start_is_zero_before_training_and_positive_after(bench, tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=0)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]
    # LoRA starts as a zero update: the policy is its own start model
    assert bench.kl_chunked(policy, tokenizer, texts, max_new_tokens=5, seed=0, chunk=2) == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kl = bench.kl_chunked(policy, tokenizer, texts, max_new_tokens=5, seed=0, chunk=2)
    assert kl > 0.01
    assert bench.kl_chunked(policy, tokenizer, texts, max_new_tokens=5, seed=0, chunk=2) == pytest.approx(kl)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a minute idle; several on a machine shared with other jobs
@pytest.mark.skipif(bool(missing_assets()), reason=" / ".join(missing_assets()))
def test_quick_run_gives_every_method_the_same_completions_and_heldout_set(bench, tmp_path):
    out = tmp_path / "out"
    rows = bench.main(["--quick", "--jobs", "1", "--out", str(out)])
    size = bench.SIZES["quick"]
    assert set(rows) == set(bench.QUICK_METHODS)
    runs = {m: json.loads((out / "runs" / f"{m}-seed0.json").read_text()) for m in bench.QUICK_METHODS}
    start = json.loads((out / "start-quick.json").read_text())
    assert len(start["outputs"]) == size.heldout
    for name, run in runs.items():
        # evaluated before training and after each batch; the reward function counted every generated completion
        assert [r["completions"] for r in run["records"]] == [0, size.batch, 2 * size.batch], name
        assert run["records"][0]["bleu"] == start["bleu"] and run["records"][0]["kl"] == 0.0
        for record in run["records"]:
            assert 0 <= record["bleu"] <= 100 and 0 <= record["chrf"] <= 100 and record["kl"] >= -1e-6
    assert len(runs["ppo"]["critic"]) == 2  # one explained variance per PPO rollout
    assert (out / "real_translation.md").is_file() and (out / "real_translation.png").is_file()
