"""GPU memory and speed of 4-bit QLoRA PPO at 7B and 14B, per phase, next to `trl_gae_ext.planner`'s estimate.

    python benchmarks/memory_gpu.py --json memory_gpu.json   # the prepared command: Qwen2.5-7B and -14B shapes
    python benchmarks/memory_gpu.py --dry-run                # no model, no GPU: the settings and the planner's figures
    python benchmarks/memory_gpu.py --tiny                   # a tiny shape through the same code, on the CPU too

Needs a CUDA GPU; without one it says so and exits 0 (unless `--tiny` or `--dry-run`). Nothing is downloaded: each
model is built with random weights from the planner's built-in config (`trl_gae_ext.planner.REFERENCE_CONFIGS`):

1. the architecture is instantiated on the *meta* device (no memory), `transformers`' own
   `replace_with_bnb_linear` swaps every decoder `nn.Linear` for a `bnb.nn.Linear4bit` (lm_head excluded, as
   `from_pretrained(..., quantization_config=...)` does);
2. each 4-bit weight is drawn in bf16 directly on the GPU, one matrix at a time, and quantized there (NF4, double
   quantization) by moving it into a `Params4bit`; embeddings, lm_head and norms are materialized in bf16; the
   rotary embedding is rebuilt on the device (its buffers were on meta);
3. the model is marked as a bitsandbytes 4-bit model (`is_loaded_in_4bit`, `hf_quantizer`), so the package and PEFT
   treat it exactly like one loaded with `from_pretrained`.
This never holds more than the 4-bit model plus one bf16 matrix, so 32B (~18 GiB in 4-bit) builds on one GPU without
a checkpoint on disk or 65 GB of CPU RAM; random weights change no tensor shape, so memory is the real one.

The measurement is `benchmarks/memory_cpu.measure_ppo_phases` (the same instrumented `PPOTrainer` run as the CPU
benchmark) with `live_bytes.CudaPeaks`: `value_head="adapter"`, LoRA r=16 on all linears (+ the frozen `ref` adapter),
gradient checkpointing, the trainer's own log-prob chunking and upcast defaults, one PPO epoch, the issue's setup by
default (batch 8 = micro batch 4 x 2 mini-batches, prompt 256 + response 512, every response forced to full length by
`min_new_tokens`), a cheap Python reward, `--steps` PPO iterations. Per phase (generation, scoring, training): the
peak `torch.cuda.max_memory_allocated`/`max_memory_reserved`, beside the planner's `phases_allocated`; rollout tokens/s
(generated tokens / generation time) and training tokens/s (prompt + response tokens / training time), both from
the last iteration (the first warms up). Each shape runs in its own process. Expected cost on one recent datacenter
GPU: a few minutes for both shapes (an estimate, not a measurement: run it with `timeout 480`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trl_gae_ext.planner import GIB, REFERENCE_CONFIGS, estimate_ppo_memory  # noqa: E402


TINY_CONFIG = {**REFERENCE_CONFIGS["qwen2.5-7b"], "hidden_size": 64, "intermediate_size": 352,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
               "bos_token_id": 2, "eos_token_id": 1}  # fmt: skip
TINY_SHAPE = dict(batch_size=4, prompt_length=16, response_length=16)
DEFAULT_MODELS = ("qwen2.5-7b", "qwen2.5-14b")
PHASES = ("generation", "scoring", "training")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(REFERENCE_CONFIGS),
                        help="reference shapes to measure (default: qwen2.5-7b qwen2.5-14b)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 shape instead; allowed on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="build nothing: print the settings and the planner")
    parser.add_argument("--batch-size", type=int, default=None, help="rollout batch per device (default 8)")
    parser.add_argument("--num-mini-batches", type=int, default=2, help="optimizer steps per rollout (default 2)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="training micro batch (default: batch / mini-batches, so 8 = 4 x 2)")  # fmt: skip
    parser.add_argument("--prompt-length", type=int, default=None, help="default 256")
    parser.add_argument("--response-length", type=int, default=None, help="default 512")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="PPO iterations per shape (the first warms up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    defaults = TINY_SHAPE if args.tiny else dict(batch_size=8, prompt_length=256, response_length=512)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    micro = args.micro_batch_size or args.batch_size // args.num_mini_batches
    if micro < 1 or args.batch_size % (micro * args.num_mini_batches):
        parser.error(f"batch {args.batch_size} is not micro batch x gradient accumulation x {args.num_mini_batches}")
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first iteration warms up, the figures come from the last")
    return args


def shapes_of(args) -> dict[str, dict]:
    return {"tiny": TINY_CONFIG} if args.tiny else {m: REFERENCE_CONFIGS[m] for m in args.models}


# -- building a random 4-bit model without a checkpoint ----------------------------------------------------------------
def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def build_random_4bit_model(config_dict: dict, device, seed: int = 0, std: float = 0.02):
    """A causal LM with random NF4 weights, built layer by layer on `device` from a config (see the module doc)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    quant = bnb_config()
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16, device=device)
            weight.normal_(0.0, std, generator=gen)
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                              quant_storage=torch.uint8, module=module).to(device)  # fmt: skip
            del weight
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                data = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                data.fill_(1.0) if "norm" in type(module).__name__.lower() else data.normal_(0.0, std, generator=gen)
                module.register_parameter(name, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    for name, module in list(model.named_modules()):  # rotary embeddings: buffers computed at init
        if any(b.is_meta for b in module.buffers(recurse=False)):
            model.set_submodule(name, type(module)(config=model.config).to(device))
    if config.tie_word_embeddings:
        model.tie_weights()
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left on the meta device: {leftovers[:5]}")
    # what from_pretrained(..., quantization_config=...) sets, so PEFT and trl_gae_ext.qlora see a 4-bit model
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.hf_quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
    model.config.quantization_config = quant
    return model.eval()


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per model token, so every sampled id decodes: ids 0-2 are the special
    tokens (whole strings that no word contains, as added tokens match anywhere), ids 3.. the words "w3".."w{V-1}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")  # fmt: skip


def random_prompts(vocab_size: int, n: int, length: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(length)) for _ in range(n)]


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A cheap reward: distinct words / words (nothing but a number for PPO to chase)."""
    return [len(set(c.split())) / max(1, len(c.split())) for c in completions]


# -- measurement ---------------------------------------------------------------------------------------------------
def planned(name: str, config_dict: dict, args, device: str):
    """The planner for the run's settings and the trainer's log-prob and upcast defaults (`device` "cuda" adds the
    CUDA terms to `phases`; `phases_allocated` is what `max_memory_allocated` measures either way)."""
    from benchmarks.memory_cpu import trainer_defaults

    return estimate_ppo_memory(
        config_dict, batch_size=args.batch_size, prompt_length=args.prompt_length,
        response_length=args.response_length, num_mini_batches=args.num_mini_batches,
        micro_batch_size=args.micro_batch_size, lora_r=args.lora_r, value_head="adapter",
        gradient_checkpointing=True, device=device, model_name=name, **trainer_defaults(),
    )  # fmt: skip


def measure(name: str, config_dict: dict, args, device) -> dict:
    """One instrumented PPOTrainer run on `device`: per phase the peak allocated (and reserved) bytes beside the
    planner, rollout and training tokens/s of the last iteration."""
    from benchmarks.live_bytes import AllocatedBytes, CudaPeaks
    from benchmarks.memory_cpu import measure_ppo_phases

    cuda = device.type == "cuda"
    est = planned(name, config_dict, args, "cuda" if cuda else "cpu")
    model = build_random_4bit_model(config_dict, device, seed=args.seed)
    start = time.perf_counter()
    measured = measure_ppo_phases(
        model, build_tokenizer(config_dict["vocab_size"]), batch_size=args.batch_size,
        prompt_length=args.prompt_length, response_length=args.response_length,
        micro_batch_size=args.micro_batch_size, num_mini_batches=args.num_mini_batches, lora_r=args.lora_r,
        iterations=args.steps, seed=args.seed, tracker_class=CudaPeaks if cuda else AllocatedBytes, use_cpu=not cuda,
    )  # fmt: skip
    tracker = measured.pop("tracker")
    out = {"seconds": time.perf_counter() - start, "planner_peak": est.peak, "phases": {}}
    for phase in PHASES:
        out["phases"][phase] = {
            "allocated": measured[phase],
            "reserved": getattr(tracker, "reserved", {}).get(phase),
            "planned": est.phases_allocated[phase],
        }
    seconds = getattr(tracker, "seconds", {})
    if seconds:  # the last iteration's entries: one generation call, one training entry per micro-batch
        micro_batches = len(seconds["training"]) // args.steps
        out["rollout_tokens_per_s"] = args.batch_size * args.response_length / seconds["generation"][-1]
        out["training_tokens_per_s"] = (
            args.batch_size * (args.prompt_length + args.response_length) / sum(seconds["training"][-micro_batches:])
        )
    return out


def report(name: str, result: dict, device) -> None:
    print(f"\n== {name} on {device}: {result['seconds']:.0f} s, planner peak {_gib(result['planner_peak'])} GiB "
          "(incl. CUDA context and allocator reserve)")  # fmt: skip
    print(f"  {'phase':<12}{'max_allocated':>14}{'max_reserved':>14}{'planned':>10}{'measured/planned':>18}")
    for phase, row in result["phases"].items():
        ratio = row["allocated"] / row["planned"]
        print(f"  {phase:<12}{_gib(row['allocated']):>14}{_gib(row['reserved']):>14}{_gib(row['planned']):>10}"
              f"{ratio:>18.3f}")  # fmt: skip
    if "rollout_tokens_per_s" in result:
        print(f"  rollout {result['rollout_tokens_per_s']:.0f} tokens/s, training "
              f"{result['training_tokens_per_s']:.0f} tokens/s (last iteration)")  # fmt: skip


def dry_run(args) -> int:
    """The settings and the planner's per-phase figures of each shape, without building anything."""
    print(describe(args, "dry run, nothing is built"))
    for name, config_dict in shapes_of(args).items():
        est = planned(name, config_dict, args, "cuda")
        phases = ", ".join(f"{k} {_gib(v)}" for k, v in est.phases_allocated.items())
        print(f"  {name}: planner allocated per phase (GiB): {phases}; peak {_gib(est.peak)} GiB with CUDA terms")
    return 0


def describe(args, device_name: str) -> str:
    from benchmarks.memory_cpu import trainer_defaults

    defaults = trainer_defaults()
    micro = args.micro_batch_size or args.batch_size // args.num_mini_batches
    return (
        f"device: {device_name}; batch {args.batch_size} = micro {micro} x {args.batch_size // micro} "
        f"({args.num_mini_batches} mini-batches), prompt {args.prompt_length} + response {args.response_length}, "
        f"LoRA r={args.lora_r} all-linear, value_head='adapter', gradient checkpointing, log-probs "
        f"{'in chunks of ' + str(defaults['logprob_chunk_size']) if defaults['logprob_chunk_size'] else 'from full logits'}"
        f", {'fp32' if defaults['kbit_upcast'] else 'bf16'} embeddings/lm_head, {args.steps} iterations"
    )


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _measure_in_subprocess(shape: str, argv: list[str]) -> dict:
    import subprocess

    rest, skip = [], False
    for arg in argv:  # drop --models/--json and their values, the child gets its own
        if arg in ("--models", "--json"):
            skip = True
        elif arg.startswith("--"):
            skip = False
        if not skip:
            rest.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, __file__, *rest, "--models", shape, "--json", str(out)])
        if not out.exists():
            return {"error": f"the measurement process exited with {done.returncode}"}
        return json.loads(out.read_text())["results"][shape]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("CUDA is not available on this machine: benchmarks/memory_gpu.py measures GPU memory and needs a CUDA "
              "GPU. Nothing was measured (--dry-run prints the plan, --tiny runs a tiny shape on the CPU).")  # fmt: skip
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(describe(args, name))
    shapes = shapes_of(args)
    if len(shapes) > 1:  # one process per shape: nothing of one run inflates the next
        results = {
            shape: _measure_in_subprocess(shape, argv if argv is not None else sys.argv[1:]) for shape in shapes
        }
    else:
        results = {}
        for shape, config_dict in shapes.items():
            try:
                results[shape] = measure(shape, config_dict, args, device)
            except Exception as err:  # noqa: BLE001 - the JSON says which shape failed and why
                results[shape] = {"error": f"{type(err).__name__}: {err}"}
    for shape, result in results.items():
        if "error" in result:
            print(f"\n== {shape}: failed: {result['error']}")
        elif len(shapes) == 1:  # a child process printed its own report
            report(shape, result, name)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2, default=str))  # fmt: skip
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
