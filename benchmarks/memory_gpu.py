"""GPU memory and speed of 4-bit QLoRA PPO on the reference shapes, next to `trl_gae_ext.planner`'s estimate.

    python benchmarks/memory_gpu.py                          # 7B, 8B, 14B, 32B; batch 8, prompt 256, response 512
    python benchmarks/memory_gpu.py --models qwen2.5-7b --mode loop --steps 3
    python benchmarks/memory_gpu.py --tiny                   # a tiny shape; runs on the CPU too (smoke test)

Needs a CUDA GPU; without one it says so and exits 0 (unless `--tiny`). Nothing is downloaded: each model is built
with random weights from the planner's built-in config (`trl_gae_ext.planner.REFERENCE_CONFIGS`):

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

Two measurements per shape (`--mode`):
- `trainer`: `trl_gae_ext.PPOTrainer` with `value_head="adapter"`, LoRA r=16 on all linears, gradient checkpointing,
  one PPO epoch of one mini-batch per rollout, every response exactly `--response-length` tokens
  (`min_new_tokens`), a cheap Python reward. Peak `torch.cuda.max_memory_allocated/reserved` over `--steps` PPO
  iterations; rollout tokens/s from the trainer's own `time/generation_s` log, training tokens/s from the rest.
- `loop`: the same QLoRA layout built with PEFT directly (so the figure exists even if the trainer changes):
  generate, no-grad scoring (policy log-probs, critic values, reference log-probs with adapters off), one
  forward+backward of policy and critic over prompt+response with gradient checkpointing, one AdamW step. Peak
  memory per phase, next to the planner's per-phase estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trl_gae_ext.planner import GIB, REFERENCE_CONFIGS, estimate_ppo_memory  # noqa: E402


TINY_CONFIG = {**REFERENCE_CONFIGS["qwen2.5-7b"], "hidden_size": 256, "intermediate_size": 688,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8192,
               "bos_token_id": 2, "eos_token_id": 1}  # fmt: skip
TINY_SHAPE = dict(batch_size=4, prompt_length=32, response_length=64)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_CONFIGS), choices=list(REFERENCE_CONFIGS),
                        help="reference shapes to measure (default: all four)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 shape instead; allowed on the CPU")
    parser.add_argument("--mode", choices=("trainer", "loop", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="rollout batch = micro batch (default 8)")
    parser.add_argument("--prompt-length", type=int, default=None, help="default 256")
    parser.add_argument("--response-length", type=int, default=None, help="default 512")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="PPO iterations per measurement (the first warms up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    defaults = TINY_SHAPE if args.tiny else dict(batch_size=8, prompt_length=256, response_length=512)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


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


# -- memory accounting ---------------------------------------------------------------------------------------------------
class Meter:
    """Peak memory of a phase: CUDA allocator statistics on a GPU; on the CPU, the bytes of live tensor storages
    (resident model/optimizer tensors + a dispatch-mode tracker of everything allocated during the phase)."""

    def __init__(self, device, resident=()):
        self.device, self.resident = device, list(resident)

    @contextlib.contextmanager
    def phase(self, results: dict, name: str):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            yield
            torch.cuda.synchronize()
            allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        else:
            tracker = _CpuTracker(self.resident)
            start = time.perf_counter()
            with tracker:
                yield
            allocated, reserved = tracker.resident_bytes + tracker.peak, None
        entry = results.setdefault(name, {"allocated": 0, "reserved": 0, "seconds": []})
        entry["allocated"] = max(entry["allocated"], allocated)
        entry["reserved"] = max(entry["reserved"] or 0, reserved or 0) or None
        entry["seconds"].append(time.perf_counter() - start)


def _resident_tensors(model, optimizer=None):
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
        if p.grad is not None:
            tensors.append(p.grad)
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if hasattr(t, "untyped_storage")]
    return tensors


def _cpu_tracker_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    class CpuTracker(TorchDispatchMode):
        def __init__(self, resident):
            super().__init__()
            self.live, self.now, self.peak = WeakIdKeyDictionary(), 0, 0
            storages = {id(t.untyped_storage()): t.untyped_storage() for t in resident}
            self.resident_bytes = sum(s.nbytes() for s in storages.values())
            for storage in storages.values():
                self.live[storage] = 0

        def _free(self, n):
            self.now -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage() not in self.live:
                    n = t.untyped_storage().nbytes()
                    self.live[t.untyped_storage()] = n
                    weakref.finalize(t.untyped_storage(), self._free, n)
                    self.now += n
                    self.peak = max(self.peak, self.now)
            return out

    return CpuTracker


def _CpuTracker(resident):  # noqa: N802 - built lazily so `--help` needs no torch
    return _cpu_tracker_class()(resident)


# -- the trainer-independent loop ------------------------------------------------------------------------------------
@contextlib.contextmanager
def adapter(model, name):
    """Activate a PEFT adapter (None: all off) and keep both adapters trainable (PEFT freezes the inactive one)."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    if name is None:
        with model.disable_adapter():
            yield
    else:
        previous = model.active_adapter
        model.set_adapter(name)
        for p in lora:
            p.requires_grad_(True)
        try:
            yield
        finally:
            model.set_adapter(previous)
            for p in lora:
                p.requires_grad_(True)


def _logprobs(model, ids, mask, r, temperature=1.0):
    import torch

    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=r + 1, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    return torch.gather(logits, -1, ids[:, -r:, None])[..., 0] - torch.logsumexp(logits, -1)


def _values(model, head, ids, mask, r):
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[:, -r - 1 : -1].to(head.weight.dtype))[..., 0]


def run_loop(model, tok, args, device) -> dict:
    """generate -> score -> one PPO-style update, `args.steps` times; peak memory and time per phase."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.add_adapter("critic", lora)
    with adapter(model, "default"):
        pass  # leaves both adapters trainable
    head = torch.nn.Linear(model.config.hidden_size, 1).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    b, p, r = args.batch_size, args.prompt_length, args.response_length
    enc = tok(random_prompts(len(tok), b, p, args.seed), return_tensors="pt")
    prompt, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    results: dict = {}
    for _ in range(args.steps):
        meter = Meter(device, _resident_tensors(model, optimizer) + list(head.parameters()))
        model.eval()
        with meter.phase(results, "generation"), torch.no_grad(), adapter(model, "default"):
            seq = model.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=r, min_new_tokens=r,
                                 do_sample=True, temperature=1.0, top_k=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
        mask = torch.ones_like(seq)
        with meter.phase(results, "scoring"), torch.no_grad():
            with adapter(model, "default"):
                old = _logprobs(model, seq, mask, r)
            with adapter(model, "critic"):
                old_values = _values(model, head, seq, mask, r)
            with adapter(model, None):
                _logprobs(model, seq, mask, r)
        model.train()
        with meter.phase(results, "training"):
            with adapter(model, "default"):
                new = _logprobs(model, seq, mask, r)
            with adapter(model, "critic"):
                values = _values(model, head, seq, mask, r)
            advantages = torch.randn_like(old)
            loss = -(torch.exp(new - old) * advantages).mean() + 0.1 * ((values - old_values.float()) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for name, tokens in (("generation", b * r), ("scoring", b * (p + r)), ("training", b * (p + r))):
        seconds = results[name]["seconds"][-1]
        results[name]["tokens_per_s"] = tokens / seconds
    return results


# -- the package's trainer -------------------------------------------------------------------------------------------
def run_trainer(model, tok, args, device) -> dict:
    from datasets import Dataset
    from peft import LoraConfig

    import trl_gae_ext

    b, p, r = args.batch_size, args.prompt_length, args.response_length
    with tempfile.TemporaryDirectory() as out:
        config = trl_gae_ext.PPOConfig(
            output_dir=out, value_head="adapter", gradient_checkpointing=True, per_device_train_batch_size=b,
            response_length=r, max_prompt_length=p, num_ppo_epochs=1, num_mini_batches=1, total_episodes=b * args.steps,
            temperature=1.0, generation_kwargs={"min_new_tokens": r}, learning_rate=1e-6, logging_steps=1,
            save_strategy="no", report_to=[], seed=args.seed, use_cpu=device.type != "cuda",
        )  # fmt: skip
        trainer = trl_gae_ext.PPOTrainer(
            model=model, reward_funcs=length_reward, args=config,
            peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                   target_modules="all-linear", task_type="CAUSAL_LM"),
            train_dataset=Dataset.from_dict({"prompt": random_prompts(len(tok), b * args.steps, p, args.seed)}),
            processing_class=tok,
        )  # fmt: skip
        results: dict = {}
        meter = Meter(device, _resident_tensors(trainer.model))
        with meter.phase(results, "ppo"):
            trainer.train()
    logs = trainer.state.log_history
    generation = sum(entry.get("time/generation_s", 0.0) for entry in logs)
    rollout = sum(entry.get("time/rollout_s", 0.0) for entry in logs)
    total = results["ppo"]["seconds"][-1]
    results["ppo"]["rollout_tokens_per_s"] = b * args.steps * r / generation if generation else None
    results["ppo"]["training_tokens_per_s"] = b * args.steps * (p + r) / max(total - rollout, 1e-9)
    del trainer
    return results


# -- report ------------------------------------------------------------------------------------------------------------
def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def report(name: str, est, loop: dict | None, trainer: dict | None, device) -> None:
    print(f"\n== {name} on {device}: planner peak {_gib(est.peak)} GiB ({est.peak_phase}, incl. CUDA overhead); "
          f"allocated per phase: " + ", ".join(f"{k} {_gib(v)}" for k, v in est.phases_allocated.items()))  # fmt: skip
    if loop:
        print("  loop phase     max_allocated  max_reserved  planner allocated  measured/planner  tokens/s")
        for phase in ("generation", "scoring", "training"):
            m, planned = loop[phase], est.phases_allocated[phase]
            print(f"  {phase:<14} {_gib(m['allocated']):>13}  {_gib(m['reserved']):>12}  {_gib(planned):>17}  "
                  f"{m['allocated'] / planned:>16.2f}  {m['tokens_per_s']:>8.0f}")  # fmt: skip
    if trainer:
        m = trainer["ppo"]
        planned = max(est.phases_allocated.values())
        rollout = m["rollout_tokens_per_s"]
        print(f"  PPOTrainer: max_allocated {_gib(m['allocated'])} GiB, max_reserved {_gib(m['reserved'])} GiB, "
              f"planner {_gib(planned)} GiB allocated (ratio {m['allocated'] / planned:.2f}); rollout "
              f"{rollout:.0f} tokens/s, training {m['training_tokens_per_s']:.0f} tokens/s"
              if rollout else f"  PPOTrainer: max_allocated {_gib(m['allocated'])} GiB")  # fmt: skip


def measure(name: str, config_dict: dict, args, device) -> dict:
    import gc

    import torch

    est = estimate_ppo_memory(config_dict, batch_size=args.batch_size, prompt_length=args.prompt_length,
                              response_length=args.response_length, lora_r=args.lora_r, value_head="adapter",
                              gradient_checkpointing=True, model_name=name)  # fmt: skip
    tok = build_tokenizer(config_dict["vocab_size"])
    out: dict = {"planner": {"peak": est.peak, "phases_allocated": est.phases_allocated}}
    for mode, runner in (("loop", run_loop), ("trainer", run_trainer)):
        if args.mode not in (mode, "both"):
            continue
        if device.type == "cuda" and torch.cuda.memory_allocated() > 64 * 2**20:
            print(f"  warning: {_gib(torch.cuda.memory_allocated())} GiB still allocated before the {mode} path; "
                  "its figures include them")  # fmt: skip
        model = build_random_4bit_model(config_dict, device, seed=args.seed)
        try:
            out[mode] = runner(model, tok, args, device)
        except Exception as err:  # noqa: BLE001 - one path failing must not hide the other's figure
            out[mode] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {mode} path failed on {name}: {out[mode]['error']}")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = {k: v for k, v in out.items() if k in ("loop", "trainer") and "error" not in v}
    report(name, est, ok.get("loop"), ok.get("trainer"), device)
    return out


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
            return {"planner": {}, "child": {"error": f"the measurement process exited with {done.returncode}"}}
        return json.loads(out.read_text())["results"][shape]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("CUDA is not available on this machine: benchmarks/memory_gpu.py measures GPU memory and needs a CUDA "
              "GPU. Nothing was measured (run with --tiny for a CPU smoke test of the same code paths).")  # fmt: skip
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; batch {args.batch_size}, prompt {args.prompt_length}, response {args.response_length}, "
          f"LoRA r={args.lora_r} all-linear, value_head='adapter', gradient checkpointing, {args.steps} iterations")  # fmt: skip
    shapes = {"tiny": TINY_CONFIG} if args.tiny else {m: REFERENCE_CONFIGS[m] for m in args.models}
    if len(shapes) > 1 and device.type == "cuda":  # one process per shape: nothing of one run inflates the next
        results = {
            shape: _measure_in_subprocess(shape, argv if argv is not None else sys.argv[1:]) for shape in shapes
        }
    else:
        results = {shape: measure(shape, config_dict, args, device) for shape, config_dict in shapes.items()}
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2, default=str))  # fmt: skip
    failed = [shape for shape, r in results.items() if all("error" in r[m] for m in r if m != "planner")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
