"""Speed and exactness of `trl_gae_ext.compute_gae` against TRL 1.12's GAE loop, on the CPU.

The baseline is the loop of TRL 1.12's PPO trainer (`trl/experimental/ppo/ppo_trainer.py`, "6. compute advantages
and returns"): a reverse loop over t, vectorised over the batch, that runs on padded tensors (rewards and values 0
after the end of each response, which makes the padding terminal). `compute_gae` takes the mask instead.

Both run on the same ragged batch (lengths drawn in [1, T], plus an empty and a full row); the table reports the
median time over repeats, the speed-up, the largest difference to the baseline on valid tokens, and the largest
error of each against a float64 computation.

Usage: python benchmarks/gae.py [--batch-size 64] [--lengths 128 1024] [--repeats 25] [--threads 0 1]
(--threads 0 keeps torch's default thread count.)
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


try:
    import trl_gae_ext  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trl_gae_ext.gae import compute_gae  # noqa: E402


def trl112_gae(rewards, values, gamma, lam):
    """TRL 1.12's loop, verbatim but for the names of the config fields."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def make_batch(batch_size, T, seed=0):
    """Per-token -beta*KL-like rewards plus a sequence score on the last token; padding zeroed for the baseline."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (batch_size,), generator=g)
    lengths[0], lengths[1] = 0, T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = -0.05 * torch.rand(batch_size, T, generator=g)
    rows = torch.arange(batch_size)[lengths > 0]
    rewards[rows, lengths[lengths > 0] - 1] += torch.randn(len(rows), generator=g)
    values = torch.randn(batch_size, T, generator=g)
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    return rewards, values, mask


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_case(batch_size, T, lam_kind, repeats, gamma=0.99):
    rewards, values, mask = make_batch(batch_size, T)
    lam = 0.95 if lam_kind == "float" else torch.linspace(0.8, 1.0, batch_size)

    baseline_ms = median_ms(lambda: trl112_gae(rewards, values, gamma, lam), repeats)
    ours_ms = median_ms(lambda: compute_gae(rewards, values, mask, gamma, lam), repeats)

    base_adv, base_ret = trl112_gae(rewards, values, gamma, lam)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_lam = lam if isinstance(lam, float) else lam.double()
    ref_adv, _ = trl112_gae(rewards.double(), values.double(), gamma, ref_lam)
    diff = max((adv - base_adv)[mask].abs().max().item(), (ret - base_ret)[mask].abs().max().item())
    err_ours = (adv.double() - ref_adv)[mask].abs().max().item()
    err_base = (base_adv.double() - ref_adv)[mask].abs().max().item()
    assert (adv[~mask] == 0).all() and diff < 1e-4, f"compute_gae disagrees with the baseline: {diff}"
    return baseline_ms, ours_ms, diff, err_base, err_ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0 = torch's default")
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__} on {platform.machine()} ({default_threads} threads by default); B={args.batch_size}, "
        f"float32, gamma=0.99; median of {args.repeats} runs; ragged batch (one empty row, one full row); "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    header = (
        "| threads | T    | lambda  | TRL 1.12 loop (ms) | compute_gae (ms) | speed-up | max abs diff | "
        "max err vs fp64: loop / ours |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for T in args.lengths:
            for lam_kind in ("float", "per-row"):
                base, ours, diff, err_base, err_ours = run_case(args.batch_size, T, lam_kind, args.repeats)
                print(
                    f"| {torch.get_num_threads():<7} | {T:<4} | {lam_kind:<7} | {base:>18.3f} | {ours:>16.3f} | "
                    f"{base / ours:>7.1f}x | {diff:>12.1e} | {err_base:>18.1e} / {err_ours:.1e} |"
                )
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
