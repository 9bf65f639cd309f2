"""Where a PPO iteration of `trl_gae_ext.PPOTrainer` spends its time, phase by phase, inside the update too.

    python benchmarks/profile_iteration.py --model smollm2 --batch-size 16 --num-ppo-epochs 1 --iterations 3
    python benchmarks/profile_iteration.py --hidden-size 128 --num-layers 2 --iterations 3   # tiny models, seconds

The same models, prompts and settings as `benchmarks/throughput.py` (its options, its `worker_ours`), run once in this
process. Timers wrap the trainer's phases (generation, the no-grad scoring passes, rewards, the update's forwards,
backward, optimizer step, gradient clipping) and, inside them, the policy's log-prob pass, the critic's backbone and
the reference pass. Only the iterations after the first (warm-up) count. Wall-clock seconds on the CPU, where every
op runs synchronously; a phase's nested rows are part of it, and what no timer covers is shown as "other".
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (the sibling benchmark: models, prompts, settings, the trainer's worker)


class PhaseTimer:
    """Wall time per call path of wrapped functions: `(outer label, inner label)` -> seconds."""

    def __init__(self):
        self.seconds: dict[tuple[str, ...], float] = defaultdict(float)
        self.stack: list[str] = []
        self.counting = False

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.counting:
                    self.seconds[tuple(self.stack)] += time.perf_counter() - start
                self.stack.pop()

        setattr(owner, name, timed)


def instrument(timer: PhaseTimer) -> None:
    import accelerate
    import torch

    from trl_gae_ext import modeling, trainer

    timer.wrap(trainer.PPOTrainer, "_generate", "generation")
    timer.wrap(trainer.PPOTrainer, "_score_tokens", "scoring passes (no grad)")
    timer.wrap(trainer.PPOTrainer, "_score_completions", "rewards (decode, re-tokenize, reward model)")
    timer.wrap(trainer.PPOTrainer, "compute_loss", "update: forwards and losses")
    timer.wrap(accelerate.Accelerator, "backward", "update: backward")
    timer.wrap(accelerate.Accelerator, "clip_grad_norm_", "update: gradient clipping")
    timer.wrap(torch.optim.AdamW, "step", "update: AdamW step")
    timer.wrap(modeling, "response_logprobs", "log-prob pass (backbone + lm_head)")
    timer.wrap(modeling.PolicyValueModel, "_critic_hidden", "critic backbone")
    timer.wrap(modeling.PolicyValueModel, "reference_logprobs", "reference log-probs")
    timer.wrap(modeling, "chunked_logprobs", "lm_head + log-softmax (chunked)")


def report(timer: PhaseTimer, seconds: float, iterations: int) -> str:
    lines = [
        f"{iterations} timed iterations, {seconds:.1f} s ({seconds / iterations:.2f} s each)",
        "",
        "| phase | s/iteration | share |",
        "|---|---:|---:|",
    ]
    outer = sorted({path[0] for path in timer.seconds}, key=lambda k: -timer.seconds[(k,)])
    for label in outer:
        total = timer.seconds[(label,)]
        lines.append(f"| {label} | {total / iterations:.2f} | {100 * total / seconds:.0f}% |")
        inner = [(p, s) for p, s in timer.seconds.items() if len(p) > 1 and p[0] == label]
        for path, s in sorted(
            inner, key=lambda item: [-timer.seconds[item[0][:i]] for i in range(2, len(item[0]) + 1)]
        ):
            lines.append(
                f"| {'&nbsp;&nbsp;' * (len(path) - 1)}{path[-1]} | {s / iterations:.2f} | {100 * s / seconds:.0f}% |"
            )
    covered = sum(s for p, s in timer.seconds.items() if len(p) == 1)
    lines.append(f"| other (trainer loop, GAE, statistics, logging) | {(seconds - covered) / iterations:.2f} | "
                 f"{100 * (seconds - covered) / seconds:.0f}% |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal-LM checkpoint directory, or `smollm2` (offline); default: tiny")
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-mini-batches", type=int, default=1)
    parser.add_argument("--num-ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--logprob-chunk-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default="/tmp/trl-gae-profile")
    args = parser.parse_args()
    if args.iterations < 2 or args.batch_size % args.num_mini_batches:
        parser.error("--iterations must be >= 2 and --batch-size a multiple of --num-mini-batches")

    os.environ.update({k: v for k, v in throughput._worker_env().items() if k not in os.environ})
    spec = {k: v for k, v in vars(args).items() if k != "workdir"}
    workdir = os.path.abspath(args.workdir)
    spec.update(workdir=workdir, model_dir=os.path.join(workdir, "models"), num_prompts=4 * args.batch_size)
    if args.model:
        spec["model_path"] = throughput.resolve_model(args.model)
    os.makedirs(spec["model_dir"], exist_ok=True)
    throughput.build_models(spec)

    from transformers import TrainerCallback

    timer = PhaseTimer()
    instrument(timer)
    clock = {}

    class StartAfterWarmup(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == args.num_ppo_epochs * args.num_mini_batches:  # the first iteration's end
                timer.counting, clock["start"] = True, time.perf_counter()

    result = throughput.worker_ours(spec, callbacks=[StartAfterWarmup()])
    seconds = time.perf_counter() - clock["start"]
    print(f"{result['trainer']}, torch {result['torch']}, {result['threads']} threads")
    print(report(timer, seconds, args.iterations - 1))


if __name__ == "__main__":
    main()
