"""Time and peak live tensor memory of `trl_gae_ext.logprobs.chunked_logprobs` against the unchunked path, on the CPU.

The unchunked path is what `PolicyValueModel.forward` does today: `lm_head(hidden)` -> `.float() / temperature` ->
TRL's `selective_log_softmax` (and `entropy_from_logits` as a detached statistic). Both run forward + backward of
`sum(g * logprobs)` for a random `g`, from hidden states `[B, T, H]` through a frozen lm_head `[V, H]` (or a trainable
one with `--trainable-head`). For each (T, V) the table gives the median time of each path and their ratio, and the
peak bytes of the tensors created during forward + backward (storages still alive, tracked with a
`TorchDispatchMode`; the inputs and weights are not counted), next to the size of one `[B, T, V]` float32 logits.

Usage: python benchmarks/logprobs.py [--sizes 256x32000 512x32000] [--batch-size 4] [--hidden-size 256]
       [--chunk-size 512] [--dtype float32|bfloat16] [--repeats 3] [--trainable-head] [--threads 0]
A quick check: python benchmarks/logprobs.py --sizes 64x4096 --hidden-size 64 --chunk-size 64 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from trl.trainer.utils import entropy_from_logits, selective_log_softmax  # noqa: E402

from benchmarks.live_bytes import LiveBytes  # noqa: E402
from trl_gae_ext.logprobs import chunked_logprobs  # noqa: E402


def make_inputs(batch_size, T, V, H, dtype, trainable_head, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, T, H, generator=g).to(dtype).requires_grad_(True)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    head.weight.requires_grad_(trainable_head)
    targets = torch.randint(0, V, (batch_size, T), generator=g)
    upstream = torch.randn(batch_size, T, generator=g)
    return hidden, head, targets, upstream


def unchunked(hidden, head, targets, temperature):
    logits = head(hidden).float() / temperature
    logprobs = selective_log_softmax(logits, targets)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logprobs, entropy


def chunked(hidden, head, targets, temperature, chunk_size):
    return chunked_logprobs(hidden, head, targets, temperature, chunk_size=chunk_size, return_entropy=True)


def step(path, hidden, head, targets, upstream):
    """Forward + backward of `sum(upstream * logprobs)`; gradients are dropped afterwards."""
    logprobs, _ = path(hidden, head, targets)
    (logprobs * upstream).sum().backward()
    hidden.grad = None
    head.weight.grad = None


def peak_live_bytes(fn) -> int:
    with LiveBytes() as tracker:
        fn()
    return tracker.peak


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args, T, V, dtype):
    """Peak live bytes and median seconds of one forward + backward, per path, at one (T, V)."""
    hidden, head, targets, upstream = make_inputs(args.batch_size, T, V, args.hidden_size, dtype, args.trainable_head)
    paths = {
        "unchunked": lambda h, m, t: unchunked(h, m, t, args.temperature),
        "chunked": lambda h, m, t: chunked(h, m, t, args.temperature, args.chunk_size),
    }
    peak, secs = {}, {}
    for name, path in paths.items():
        run = lambda path=path: step(path, hidden, head, targets, upstream)  # noqa: E731
        peak[name] = peak_live_bytes(run)
        secs[name] = median_seconds(run, args.repeats)
    return peak, secs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x32000", "512x32000", "256x128256"], help="TxV pairs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainable-head", action="store_true", help="the lm_head weight requires grad")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    print(
        f"B={args.batch_size} H={args.hidden_size} chunk={args.chunk_size} dtype={args.dtype} "
        f"trainable_head={args.trainable_head} threads={torch.get_num_threads()}"
    )
    header = "T      V       logits MiB  unchunked MiB  chunked MiB  mem ratio  unchunked s  chunked s  time ratio"
    print(header)
    for size in args.sizes:
        T, V = (int(x) for x in size.lower().split("x"))
        peak, secs = measure(args, T, V, dtype)
        logits_bytes = 4 * args.batch_size * T * V
        mib = 2**20
        print(
            f"{T:<6} {V:<7} {logits_bytes / mib:10.1f}  {peak['unchunked'] / mib:13.1f}  {peak['chunked'] / mib:11.1f}"
            f"  {peak['chunked'] / peak['unchunked']:9.3f}  {secs['unchunked']:11.4f}  {secs['chunked']:9.4f}"
            f"  {secs['chunked'] / secs['unchunked']:10.2f}"
        )


if __name__ == "__main__":
    main()
