"""Per-sample BLEU + ROUGE-L rewards: the adapters vs a loop calling an `evaluate` module once per sample.

    python benchmarks/rewards.py [--pairs 256] [--repeats 3]

A reward function scores every completion on its own. The straightforward way with `evaluate` is a loop calling
`metric.compute(predictions=[c], references=[r])` per sample; `evaluate`'s per-call overhead (input validation,
an Arrow writer and cache file per call) dominates the metric itself. The adapters call sacrebleu / rouge_score
directly with one cached metric object. All three rows use the same code for the scores (the packaged evaluate
modules, loaded with `evaluate.load(path)` since the Hub is unreachable here, are built on the adapters), so the
scores must be identical: the script prints the largest difference and exits non-zero if it is not 0 or if the
speed-up is below 30x. Times are the best of at least `--repeats` runs and 1 s per row, after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from functools import partial
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the a of to and in is was for on that with as by at from it an be this are have not has had were which "
    "model models training reward rewards policy value critic advantage estimate token tokens sequence "
    "language translation summary text sentence reference output input data set learning rate batch step "
    "large small new first last good better best high low fast slow simple clear short long every each "
    "cat dog house river city country year day time people world number result results method methods"
).split()


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` (completion, reference) pairs of 8-40 words; references reuse part of the completion, as a policy's
    outputs partly match the reference."""
    rng = random.Random(seed)
    completions, references = [], []
    for _ in range(n):
        completion = [rng.choice(WORDS) for _ in range(rng.randint(8, 40))]
        start = rng.randint(0, len(completion) // 2)
        kept = completion[start : start + rng.randint(3, len(completion) - start)]
        reference = [rng.choice(WORDS) for _ in range(rng.randint(0, 8))] + kept
        reference += [rng.choice(WORDS) for _ in range(rng.randint(0, 8))]
        completions.append(" ".join(completion) + ".")
        references.append(" ".join(reference) + ".")
    return completions, references


def best_time(fn, repeats: int, min_seconds: float = 1.0, max_runs: int = 100):
    """Best wall time of `fn` over at least `repeats` runs and at least `min_seconds` in all (as `timeit`'s
    autorange: a fast function gets more runs, so a busy moment on a shared machine does not decide its time)."""
    best, result, runs, spent = float("inf"), None, 0, 0.0
    while runs < max_runs and (runs < repeats or spent < min_seconds):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best, runs, spent = min(best, elapsed), runs + 1, spent + elapsed
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import evaluate
    import sacrebleu
    from rouge_score import rouge_scorer  # imported here, so that no row pays for the import

    from trl_gae_ext.rewards import BleuReward, EvaluateReward, RougeReward, packaged_metric_path

    completions, references = make_pairs(args.pairs)
    prompts = [""] * len(completions)

    # 1. The straightforward loop: one evaluate compute() per sample, modules loaded from their local paths.
    bleu_module = evaluate.load(packaged_metric_path("bleu"))
    rouge_module = evaluate.load(packaged_metric_path("rouge"))

    def loop_bleu():
        return [
            bleu_module.compute(predictions=[c], references=[[r]])["bleu"] for c, r in zip(completions, references)
        ]

    def loop_rouge():
        return [
            rouge_module.compute(predictions=[c], references=[r], rouge_types=["rougeL"])["rougeL"]
            for c, r in zip(completions, references)
        ]

    # 2. EvaluateReward: the same modules, one batched compute(use_aggregator=False) per reward call.
    eval_bleu = EvaluateReward(packaged_metric_path("bleu"))
    eval_rouge = EvaluateReward(packaged_metric_path("rouge"), rouge_types=["rougeL"])

    # 3. The adapters.
    bleu, rouge = BleuReward(), RougeReward("rougeL")

    batch = {"prompts": prompts, "completions": completions, "reference": references}
    methods = [
        ("evaluate loop, 1 compute() per sample", loop_bleu, loop_rouge),
        ("EvaluateReward, 1 batched compute()", partial(eval_bleu, **batch), partial(eval_rouge, **batch)),
        ("BleuReward + RougeReward (adapters)", partial(bleu, **batch), partial(rouge, **batch)),
    ]
    rows = []
    for label, fn_bleu, fn_rouge in methods:
        fn_bleu(), fn_rouge()  # warm-up: lazy loading, scorer construction
        t_bleu, s_bleu = best_time(fn_bleu, args.repeats)
        t_rouge, s_rouge = best_time(fn_rouge, args.repeats)
        rows.append((label, t_bleu, t_rouge, s_bleu, s_rouge))

    baseline = rows[0][1] + rows[0][2]
    print(
        f"Per-sample BLEU + ROUGE-L rewards for {len(completions)} pairs (best of >= {args.repeats} runs and >= 1 s)"
    )
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, evaluate {evaluate.__version__}, "
        f"sacrebleu {sacrebleu.__version__}"
    )
    print()
    header = f"| {'method':<38} | {'BLEU ms':>9} | {'ROUGE-L ms':>10} | {'total ms':>9} | {'us/pair':>8} | {'speed-up':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for label, t_bleu, t_rouge, _, _ in rows:
        total = t_bleu + t_rouge
        print(
            f"| {label:<38} | {1e3 * t_bleu:>9.1f} | {1e3 * t_rouge:>10.1f} | {1e3 * total:>9.1f} | "
            f"{1e6 * total / len(completions):>8.0f} | {baseline / total:>7.1f}x |"
        )

    _, _, _, loop_bleu_scores, loop_rouge_scores = rows[0]
    max_diff = 0.0
    for label, _, _, s_bleu, s_rouge in rows[1:]:
        diff_bleu = max(abs(a - b) for a, b in zip(s_bleu, loop_bleu_scores))
        diff_rouge = max(abs(a - b) for a, b in zip(s_rouge, loop_rouge_scores))
        max_diff = max(max_diff, diff_bleu, diff_rouge)
        print(f"max |score - loop score| for {label}: BLEU {diff_bleu:.1e}, ROUGE-L {diff_rouge:.1e}")
    # And against the reference libraries themselves.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct_bleu = [min(sacrebleu.sentence_bleu(c, [r]).score / 100, 1.0) for c, r in zip(completions, references)]
    direct_rouge = [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(completions, references)]
    _, _, _, s_bleu, s_rouge = rows[2]
    diff_bleu = max(abs(a - b) for a, b in zip(s_bleu, direct_bleu))
    diff_rouge = max(abs(a - b) for a, b in zip(s_rouge, direct_rouge))
    max_diff = max(max_diff, diff_bleu, diff_rouge)
    print(
        f"max |adapter - sacrebleu.sentence_bleu / 100| {diff_bleu:.1e}, max |adapter - rouge_score| {diff_rouge:.1e}"
    )
    n = len(completions)
    print(f"mean BLEU {sum(loop_bleu_scores) / n:.4f}, mean ROUGE-L {sum(loop_rouge_scores) / n:.4f}")

    speedup = baseline / (rows[2][1] + rows[2][2])
    ok = speedup >= 30 and max_diff == 0.0
    print(
        f"adapters: {speedup:.1f}x faster than the loop, identical scores: {max_diff == 0.0} -> {'OK' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
