"""The built-in demo: the task generator, the cache key, and an end-to-end smoke run through `trl-gae ppo`."""

import json
import re

import pytest

from trl_gae_ext import cli, demo, demo_task


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (99, "ninety nine"),
        (100, "one hundred"),
        (110, "one hundred ten"),
        (700, "seven hundred"),
        (1000, "one thousand"),
        (1001, "one thousand one"),
        (4000, "four thousand"),
        (4021, "four thousand twenty one"),
        (4721, "four thousand seven hundred twenty one"),
        (7777, "seven thousand seven hundred seventy seven"),
        (9999, "nine thousand nine hundred ninety nine"),
    ],
)
def test_number_to_words(n, words):
    assert demo_task.number_to_words(n) == words


@pytest.mark.parametrize("n", [-1, 10000])
def test_number_out_of_range(n):
    with pytest.raises(ValueError, match="0-9999"):
        demo_task.number_to_words(n)


def test_answers_fit_the_response_length_and_vocabulary():
    words = {w for n in range(10000) for w in demo_task.number_to_words(n).split()}
    assert words == set(demo_task.VOCABULARY)
    longest = max(len(demo_task.number_to_words(n).split()) for n in range(10000))
    assert longest + 1 <= demo.RESPONSE_LENGTH  # + EOS


def test_splits_are_deterministic_and_heldout_is_never_trained_on():
    a = demo_task.make_splits(2000, 4000, 300)
    assert a == demo_task.make_splits(2000, 4000, 300)
    assert not set(a.heldout) & (set(a.ppo) | set(a.sft))
    assert (len(a.sft), len(a.ppo), len(a.heldout)) == (2000, 4000, 300)
    assert a.heldout == demo_task.make_splits(10, 20, 300).heldout  # independent of the other sizes


def test_tokenizer_reads_digits_one_by_one_and_knows_every_word():
    from trl_gae_ext.tiny import build_tokenizer

    tok = build_tokenizer(demo_task.tokenizer_corpus())
    assert tok.tokenize("4721") == ["4", "7", "2", "1"]
    ids = tok(" ".join(demo_task.VOCABULARY))["input_ids"]
    assert len(ids) == len(demo_task.VOCABULARY) and tok.unk_token_id not in ids
    assert tok.decode(tok("four thousand twenty one")["input_ids"]) == "four thousand twenty one"


def test_cache_dir_follows_xdg_and_the_key_follows_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_cache_dir() == str(tmp_path / "trl_gae_ext")
    full = demo.SIZES["full"]
    path = demo.sft_cache_path("/c", full, seed=0)
    assert re.fullmatch(r"/c/demo-sft-[0-9a-f]{12}", path)
    assert path == demo.sft_cache_path("/c", full, seed=0)
    assert path != demo.sft_cache_path("/c", full, seed=1)
    assert path != demo.sft_cache_path("/c", demo.SIZES["smoke"], seed=0)
    # PPO-only settings do not retrain the warm start
    assert path == demo.sft_cache_path("/c", demo.DemoConfig(iterations=7).settings, seed=0)


def test_unavailable_device_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cli.main(["ppo", "--device", "cuda", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "trl-gae ppo: error: --device cuda: CUDA is not available here" in err and "--device cpu" in err


LINE = re.compile(r"^held-out BLEU: (\d+\.\d) -> (\d+\.\d) \(corpus BLEU, 0-100, greedy decoding, 16 numbers")


def _run_smoke(tmp_path, capsys) -> tuple[list[str], dict]:
    argv = ["ppo", "--smoke", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(argv + ["--no_progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    return lines, summary


# with --no_progress: the title, the warm start, one line per held-out evaluation, 4 samples under a heading, exact
# answers, files written, the BLEU line; never a metrics dictionary (the Trainer's PrinterCallback printed one per
# iteration, 200 in the full demo). A library's own log record ("[2026-...] [WARNING] ...") is not the demo's.
QUIET_LINES = 1 + 1 + 1 + 4 + 1 + 1 + 1


def _assert_quiet(lines: list[str], iterations: int) -> None:
    ours = [line for line in lines if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]
    assert not any("{" in line for line in ours), ours
    reported = [line.split(":")[0] for line in ours if line.startswith("iteration ")]
    assert reported == [f"iteration {i}/{iterations}" for i in range(1, iterations + 1)]
    assert len(ours) == QUIET_LINES + iterations, ours


def test_smoke_demo_end_to_end_writes_metrics_plot_and_the_bleu_line_and_is_quiet(tmp_path, capsys):
    lines, summary = _run_smoke(tmp_path, capsys)
    _assert_quiet(lines, iterations=2)
    match = LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) == round(summary["bleu_before"], 1)
    assert float(match.group(2)) == round(summary["bleu_after"], 1)
    assert any(line.startswith("warm start: trained and cached") for line in lines)
    assert not summary["sft_cached"] and summary["settings"]["iterations"] == 2

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in train] == [1, 2]
    assert [r["iteration"] for r in evals] == [0, 1, 2]
    for record in train:
        for key in ("objective/scores", "objective/kl", "rewards/bleu/mean", "episode", "loss/value_avg"):
            assert isinstance(record[key], float | int), key
    assert train[-1]["episode"] == 2 * 16
    for record in evals:
        assert 0.0 <= record["heldout/bleu"] <= 100.0 and 0.0 <= record["heldout/exact_match"] <= 100.0
    assert evals[0]["heldout/bleu"] == pytest.approx(summary["bleu_before"])
    assert evals[-1]["heldout/bleu"] == pytest.approx(summary["bleu_after"])

    png = (tmp_path / "out" / "reward_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    (cached,) = (tmp_path / "cache").glob("demo-sft-*")
    assert json.loads((cached / "demo_sft.json").read_text())["sft_steps"] == demo.SIZES["smoke"].sft_steps

    # a second run reuses the warm start and starts from the same held-out score
    lines, second = _run_smoke(tmp_path, capsys)
    assert second["sft_cached"] and any(line.startswith("warm start: reused") for line in lines)
    _assert_quiet(lines, iterations=2)
    assert second["bleu_before"] == pytest.approx(summary["bleu_before"])
    assert LINE.match(lines[-1])
