"""Measured memory of a real PPO iteration on the CPU, per phase, beside `trl_gae_ext.planner` (without GPU terms).

    python benchmarks/memory_cpu.py                                    # Qwen2.5-0.5B and -1.5B shapes
    python benchmarks/memory_cpu.py --models qwen2.5-0.5b --batch-size 2 --prompt-length 64 --response-length 32
    python benchmarks/memory_cpu.py --models tiny                      # seconds: a 2-layer Qwen2 shape

Each shape is a model with random weights built from its config (`trl_gae_ext.model_shapes.REFERENCE_CONFIGS`, no
download), its decoder linears quantized to 4-bit NF4 with double quantization by bitsandbytes on the CPU
(`benchmarks/memory_gpu.build_random_4bit_model`). `trl_gae_ext.PPOTrainer` then runs `--iterations` PPO iterations
with the adapter critic (LoRA r=16 on all linears, gradient checkpointing, one epoch, `--micro-batch-size`
micro-batches accumulated into one optimizer step), every response forced to `--response-length` tokens
(`min_new_tokens`). `--kbit-upcast` / `--no-kbit-upcast` and `--logprob-chunk-size` are PPOConfig's `kbit_upcast`
(fp32 embeddings, norms and lm_head through `prepare_model_for_kbit_training`, or the 4-bit base only frozen) and
`logprob_chunk_size` (0 = full logits); both default to the trainer's defaults.

Memory is the peak of the bytes the CPU allocator holds (`benchmarks/live_bytes.AllocatedBytes`: its own allocation
records, kernel scratch included, plus the resident weights, quantization state and adapters allocated before)
inside each phase:
- generation: `PPOTrainer._generate`;
- scoring: `PPOTrainer._score_tokens` (policy log-probs, critic values, reference log-probs, no grad);
- training: from `compute_loss` to the end of the optimizer step (forward, backward, AdamW, `zero_grad`).
The optimizer states exist from the first optimizer step on and the planner counts them in every phase, so each
phase's figure is its largest over the iterations (keep `--iterations` at 2 or more). Beside it: the planner's
`phases_allocated` for the same shapes and settings with `device="cpu"` (no CUDA context or caching-allocator
reserve; TRL's CPU log-softmax loops instead of its fused GPU kernel), and the same ratio for the bytes above the
weights. `--json` keeps the measured figures; `--report FILE` prints them again beside today's planner.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from trl_gae_ext.planner import GIB, REFERENCE_CONFIGS, estimate_ppo_memory  # noqa: E402


TINY_CONFIG = {**REFERENCE_CONFIGS["qwen2.5-0.5b"], "hidden_size": 64, "intermediate_size": 160,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
               "bos_token_id": 2, "eos_token_id": 1}  # fmt: skip
SHAPES = {"qwen2.5-0.5b": REFERENCE_CONFIGS["qwen2.5-0.5b"], "qwen2.5-1.5b": REFERENCE_CONFIGS["qwen2.5-1.5b"],
          "tiny": TINY_CONFIG}  # fmt: skip
PHASES = ("generation", "scoring", "training")


def measure_ppo_phases(
    model,
    tokenizer,
    *,
    batch_size: int,
    prompt_length: int,
    response_length: int,
    micro_batch_size: int | None = None,
    num_mini_batches: int = 1,
    lora_r: int = 16,
    iterations: int = 2,
    seed: int = 0,
    gradient_checkpointing: bool = True,
    kbit_upcast: bool | None = None,
    tracker_class=None,
    **config_kwargs,
) -> dict[str, int]:
    """Peak allocated bytes per phase of `iterations` PPO iterations of `PPOTrainer` on `model` (a 4-bit causal LM
    with random weights; the trainer prepares it and adds the policy, critic and `ref` adapters). One rollout of
    `batch_size` = `micro_batch_size` x gradient accumulation x `num_mini_batches`. `kbit_upcast`: None leaves the
    trainer's default; else PPOConfig's `kbit_upcast` where it exists, and on a trainer without it, False hands
    the model over without its 4-bit marker (nothing is upcast). `tracker_class`: `live_bytes.AllocatedBytes` (default,
    the allocator's records), `live_bytes.LiveBytes` (op outputs only) or `live_bytes.CudaPeaks` (a GPU run); the
    tracker is returned as `phases["tracker"]` too."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback

    from benchmarks.live_bytes import AllocatedBytes, resident_tensors
    from benchmarks.memory_gpu import length_reward, random_prompts
    from trl_gae_ext import PPOConfig, PPOTrainer

    micro = micro_batch_size or batch_size // num_mini_batches
    if kbit_upcast is not None:
        if "kbit_upcast" in trainer_fields():
            config_kwargs.setdefault("kbit_upcast", kbit_upcast)
        elif not kbit_upcast:
            model.is_loaded_in_4bit = False
    with tempfile.TemporaryDirectory() as out:
        settings = dict(
            output_dir=out, value_head="adapter", gradient_checkpointing=gradient_checkpointing,
            per_device_train_batch_size=micro, gradient_accumulation_steps=batch_size // (micro * num_mini_batches),
            response_length=response_length, max_prompt_length=prompt_length, num_ppo_epochs=1,
            num_mini_batches=num_mini_batches, total_episodes=batch_size * iterations, temperature=1.0,
            generation_kwargs={"min_new_tokens": response_length}, learning_rate=1e-6, logging_steps=1,
            save_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        args = PPOConfig(**{**settings, **config_kwargs})
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
        prompts = random_prompts(len(tokenizer), batch_size * iterations, prompt_length, seed)
        trainer = PPOTrainer(model=model, reward_funcs=length_reward, args=args, peft_config=lora,
                             train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the per-step log dicts
        tracker = (tracker_class or AllocatedBytes)(resident_tensors(trainer.model))

        def in_phase(name, method):
            def wrapped(*a, **kw):
                with tracker.phase(name):
                    return method(*a, **kw)

            return wrapped

        class TrainingPhaseEnd(TrainerCallback):
            def on_step_end(self, *_, **__):  # after the optimizer step and zero_grad
                tracker.end_phase()

        compute_loss = trainer.compute_loss

        def compute_loss_in_training_phase(*a, **kw):  # the phase runs on through backward and the optimizer step
            tracker.start_phase("training")
            return compute_loss(*a, **kw)

        trainer._generate = in_phase("generation", trainer._generate)
        trainer._score_tokens = in_phase("scoring", trainer._score_tokens)
        trainer.compute_loss = compute_loss_in_training_phase
        trainer.add_callback(TrainingPhaseEnd())
        with tracker:
            trainer.train()
    return {**{name: tracker.phases[name] for name in PHASES}, "tracker": tracker}


def trainer_fields() -> dict:
    """PPOConfig's fields and defaults in this checkout (`logprob_chunk_size`, `kbit_upcast` arrived later)."""
    from dataclasses import fields

    from trl_gae_ext import PPOConfig

    return {f.name: f.default for f in fields(PPOConfig)}


def trainer_defaults() -> dict:
    """The trainer's log-prob and upcast behaviour, spelled as the planner takes it: without the fields, today's
    path (full logits, fp32 upcast on a 4-bit base)."""
    known = trainer_fields()
    return {
        "logprob_chunk_size": known.get("logprob_chunk_size"),
        "kbit_upcast": known.get("kbit_upcast", True),
    }


def settings_of(args) -> dict:
    """The run's settings, spelled as `estimate_ppo_memory` takes them."""
    return dict(
        batch_size=args.batch_size, prompt_length=args.prompt_length, response_length=args.response_length,
        micro_batch_size=args.micro_batch_size, lora_r=args.lora_r, value_head="adapter",
        gradient_checkpointing=args.gradient_checkpointing, kbit_upcast=args.kbit_upcast,
        logprob_chunk_size=args.logprob_chunk_size,
    )  # fmt: skip


def run(name: str, config_dict: dict, args) -> dict[str, int]:
    import torch

    from benchmarks.memory_gpu import build_random_4bit_model, build_tokenizer

    settings = settings_of(args)
    extra = {"logprob_chunk_size": args.logprob_chunk_size} if "logprob_chunk_size" in trainer_fields() else {}
    model = build_random_4bit_model(config_dict, torch.device("cpu"), seed=args.seed)
    start = time.perf_counter()
    measured = measure_ppo_phases(
        model, build_tokenizer(config_dict["vocab_size"]), iterations=args.iterations, seed=args.seed,
        **{k: v for k, v in settings.items() if k not in ("value_head", "logprob_chunk_size")}, **extra,
    )  # fmt: skip
    measured.pop("tracker")
    return {**measured, "seconds": time.perf_counter() - start}


def report(name: str, config_dict: dict, measured: dict, args) -> dict:
    est = estimate_ppo_memory(config_dict, **settings_of(args), device="cpu", model_name=name)
    print(f"\n== {name}: batch {args.batch_size} (micro {args.micro_batch_size or args.batch_size}), prompt "
          f"{args.prompt_length} + response {args.response_length}, {args.iterations} iterations, "
          f"{measured['seconds']:.0f} s; planner: training peak at {est.training_peak_at!r}")  # fmt: skip
    print(f"  {'phase':<12}{'measured GiB':>14}{'planned GiB':>13}{'measured/planned':>18}{'above weights':>15}")
    rows, weights = {}, est.base_weights + est.adapters + est.reference_adapter + est.value_head
    for phase in PHASES:
        m, p = measured[phase], est.phases_allocated[phase]
        rows[phase] = {"measured": m, "planned": p, "ratio": m / p}
        # the same ratio for the bytes above the weights, which every phase shares
        print(f"  {phase:<12}{m / GIB:>14.3f}{p / GIB:>13.3f}{m / p:>18.3f}{(m - weights) / (p - weights):>15.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=4, help="rollout batch (default 4)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="training micro batch (default: batch)")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    defaults = trainer_defaults()
    parser.add_argument("--kbit-upcast", action=argparse.BooleanOptionalAction, default=defaults["kbit_upcast"],
                        help="fp32 embeddings/norms/lm_head on the 4-bit base (default: the trainer's)")  # fmt: skip
    parser.add_argument("--logprob-chunk-size", type=int, default=defaults["logprob_chunk_size"],
                        help="PPOConfig.logprob_chunk_size where the trainer has it, 0 = full logits (default: the "
                             "trainer's)")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=2, help="PPO iterations (optimizer states exist from #2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads wait on each other)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the measured figures to this JSON file")
    parser.add_argument("--report", type=Path, default=None,
                        help="measure nothing: print a JSON file written by --json beside today's planner")  # fmt: skip
    args = parser.parse_args(argv)
    args.logprob_chunk_size = args.logprob_chunk_size or None
    if args.logprob_chunk_size is not None and "logprob_chunk_size" not in trainer_fields():
        parser.error("this checkout's PPOConfig has no `logprob_chunk_size`: the trainer computes full logits")
    if args.report:
        data = json.loads(args.report.read_text())
        vars(args).update({k: v for k, v in data["args"].items() if k not in ("report", "json")})
        measured = data["measured"]
    else:
        import torch

        torch.set_num_threads(args.threads)
        measured = {}
        for name in args.models:
            measured[name] = run(name, SHAPES[name], args)
            if args.json:  # after each shape, so a long run keeps what it has measured
                saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                args.json.write_text(json.dumps({"args": saved, "measured": measured}, indent=2))
    for name, figures in measured.items():
        report(name, SHAPES[name], figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
