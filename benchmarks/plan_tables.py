"""The planner's tables in docs/memory.md, printed from today's planner (no measurement, no torch).

    python benchmarks/plan_tables.py            # the reference shapes, and what each saving buys

Setup of every row: `trl-gae plan` defaults (batch 8, prompt 256 + response 512, 4-bit NF4 base, LoRA r=16 on every
linear, `adapter` critic + the frozen `ref` adapter, gradient checkpointing, AdamW, micro batch 4 x 2 mini-batches,
log-probs in chunks of 512, no fp32 upcast, CUDA overhead included) unless the row says otherwise.
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

from trl_gae_ext.planner import GIB, estimate_ppo_memory  # noqa: E402


SHAPES = ("qwen2.5-7b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b")
BASE = dict(batch_size=8, prompt_length=256, response_length=512)
RECOMMENDED = dict(micro_batch_size=4, num_mini_batches=2)
# each step adds one change to the one above; the last rows leave the recommended setup
STEPS = [
    ("0.1.0: fp32 upcast, full logits, micro 8", dict(kbit_upcast=True, logprob_chunk_size=None, num_mini_batches=1)),
    ("+ chunked log-probs (512)", dict(kbit_upcast=True, num_mini_batches=1)),
    ("+ no fp32 upcast", dict(num_mini_batches=1)),
    ("+ micro batch 4 x 2 (recommended)", RECOMMENDED),
    ("recommended without checkpointing", dict(RECOMMENDED, gradient_checkpointing=False)),
]
FITS_32B = (
    "+ micro 1, forward chunks of 4, r=4, 8-bit AdamW",
    dict(micro_batch_size=1, num_mini_batches=2, rollout_forward_batch_size=4, lora_r=4, optimizer="adamw_8bit"),
)


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def reference_table(gpu_gib: float = 24.0) -> list[str]:
    lines = [
        "| shape | parameters | weights | `ref` adapter | activations | log-probs | generation | scoring | "
        f"training (peak) | {gpu_gib:g} GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SHAPES:
        e = estimate_ppo_memory(name, **BASE, **RECOMMENDED)
        spare = gpu_gib - e.peak / GIB
        fits = f"fits ({spare:.2f} spare)" if spare >= 0 else "no"
        lines.append(
            f"| {name} | {e.num_parameters / 1e9:.2f}B | {gib(e.base_weights)} | {gib(e.reference_adapter)} | "
            f"{gib(e.activations)} | {gib(e.logits)} | {gib(e.phases['generation'])} | {gib(e.phases['scoring'])} | "
            f"**{gib(e.phases['training'])}** | {fits} |"
        )
    return lines


def savings_table() -> list[str]:
    lines = ["| shape | setup | generation | scoring | training | peak at |", "|---|---|---|---|---|---|"]
    for name in ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b"):
        for label, change in STEPS + ([FITS_32B] if name == "qwen2.5-32b" else []):
            e = estimate_ppo_memory(name, **BASE, **change)
            p = e.phases
            lines.append(
                f"| {name} | {label} | {gib(p['generation'])} | {gib(p['scoring'])} | {gib(p['training'])} | "
                f"{e.training_peak_at} |"
            )
    return lines


def main() -> int:
    print("\n".join(reference_table()))
    print()
    print("\n".join(savings_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
