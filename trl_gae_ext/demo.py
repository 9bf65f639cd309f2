"""The built-in offline demo (`trl-gae ppo` with no arguments, or `trl-gae demo`): PPO + GAE visibly improving a model.

The task (`demo_task`): spell out integers 0-9999 in English words, prompt "4721" -> "four thousand seven hundred
twenty one", scored with `BleuReward`. A tiny Llama-style model and a word-level tokenizer are built in-process
(`trl_gae_ext.tiny`), so nothing is downloaded.

1. Supervised warm start with TRL's `SFTTrainer`, deliberately short (20 steps: the model knows the answer format and
   part of the vocabulary, held-out BLEU about 30-40). It is cached under `<cache>/demo-sft-<hash of settings>`
   (`--cache_dir`, else `$XDG_CACHE_HOME/trl_gae_ext`, else `~/.cache/trl_gae_ext`), so a second run skips it.
2. PPO with GAE and a separate critic on prompts disjoint from the held-out numbers, for 200 iterations of 64
   episodes. Every `eval_every` iterations a callback decodes the held-out numbers greedily and computes corpus
   BLEU (sacrebleu, 0-100).
3. The output directory gets `metrics.jsonl` (one record per iteration and per evaluation), `reward_curve.png`
   (reward, KL and held-out BLEU over iterations), `summary.json` and the trained policy under `model/`; the last
   printed line is `held-out BLEU: <before> -> <after> (...)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from . import demo_task
from .demo_report import make_demo_callback, plot_curves, print_samples, progress_callback, quiet
from .errors import CLIError


DEMO_VERSION = 1  # bump when a change to the demo makes cached warm starts stale
DEFAULT_OUTPUT_DIR = "trl-gae-demo"


@dataclass(frozen=True)
class DemoSize:
    """Everything that scales the demo. `full` is the tuned demo; `smoke` is a seconds-long run for the tests."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    sft_examples: int
    sft_steps: int
    sft_batch_size: int
    sft_learning_rate: float
    ppo_prompts: int
    heldout: int
    iterations: int
    per_device_train_batch_size: int
    num_mini_batches: int
    num_ppo_epochs: int
    learning_rate: float
    eval_every: int


# fmt: off
SIZES: dict[str, DemoSize] = {
    "full": DemoSize(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        sft_examples=2000, sft_steps=20, sft_batch_size=32, sft_learning_rate=3e-3,
        ppo_prompts=4000, heldout=300, iterations=200, per_device_train_batch_size=32, num_mini_batches=2,
        num_ppo_epochs=4, learning_rate=1e-3, eval_every=10,
    ),
    "smoke": DemoSize(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        sft_examples=64, sft_steps=3, sft_batch_size=16, sft_learning_rate=3e-3,
        ppo_prompts=32, heldout=16, iterations=2, per_device_train_batch_size=8, num_mini_batches=2,
        num_ppo_epochs=1, learning_rate=1e-3, eval_every=1,
    ),
}
# fmt: on

# PPO settings shared by every size; see `ppo_config` for why each one is what it is.
RESPONSE_LENGTH = 12  # the longest answer, "seven thousand seven hundred seventy seven", is 6 words + EOS
TASK_SEED = 0  # the split of 0-9999 is fixed, so every --seed is scored on the same held-out numbers


@dataclass
class DemoConfig:
    """Options of the demo run (`trl-gae demo --help`)."""

    size: str = "full"
    seed: int = 0
    output_dir: str = DEFAULT_OUTPUT_DIR
    cache_dir: str | None = None
    use_cache: bool = True
    device: str = "auto"
    iterations: int | None = None
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.size not in SIZES:
            raise CLIError(f"unknown demo size {self.size!r}", f"use one of: {', '.join(SIZES)}")
        if self.iterations is not None and self.iterations < 1:
            raise CLIError(f"--iterations must be >= 1, got {self.iterations}", "pass a positive number")

    @property
    def settings(self) -> DemoSize:
        size = SIZES[self.size]
        return replace(size, iterations=self.iterations) if self.iterations else size


@dataclass
class DemoResult:
    bleu_before: float
    bleu_after: float
    sentence_bleu_before: float
    sentence_bleu_after: float
    seconds: float
    sft_cached: bool
    sft_dir: str
    output_dir: str
    metrics_path: str
    plot_path: str
    model_dir: str
    records: list[dict] = field(default_factory=list, repr=False)

    def summary_line(self, heldout: int) -> str:
        return (
            f"held-out BLEU: {self.bleu_before:.1f} -> {self.bleu_after:.1f} "
            f"(corpus BLEU, 0-100, greedy decoding, {heldout} numbers never trained on)"
        )


# -- environment -------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/trl_gae_ext`, else `~/.cache/trl_gae_ext`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "trl_gae_ext")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise CLIError(
            f"unknown --device {name!r}", "use auto, cpu, cuda or mps (pick a GPU with CUDA_VISIBLE_DEVICES=N)"
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here", "use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps: MPS is not available here", "use --device cpu (or auto)")
    return name


@contextmanager
def quiet_libraries(num_threads: int | None):
    """Silence per-call progress bars and warnings of datasets/transformers, and pin the torch thread count.

    One thread by default on the CPU: the demo's matrices are far too small to split across cores, and with two
    threads OpenMP synchronisation made each training step 10-50x slower on a busy 2-core machine (measured: 15 ms
    vs 400-800 ms). Everything is restored on exit, since tests call the demo in-process.
    """
    import datasets
    import torch
    import transformers

    threads = torch.get_num_threads()
    datasets_bars = datasets.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    if num_threads:
        torch.set_num_threads(num_threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if datasets_bars:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(verbosity)
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()


# -- task data ---------------------------------------------------------------------------------------------------
def build_splits(settings: DemoSize) -> demo_task.TaskSplits:
    return demo_task.make_splits(settings.sft_examples, settings.ppo_prompts, settings.heldout, seed=TASK_SEED)


class HeldoutBleu:
    """Greedy decoding of the held-out prompts and corpus BLEU (sacrebleu, 0-100) against the references."""

    def __init__(self, tokenizer, numbers):
        data = demo_task.rows(numbers)
        self.tokenizer = tokenizer
        self.prompts, self.references = data["prompt"], data["reference"]

    def generate(self, model) -> list[str]:
        import torch

        tok = self.tokenizer
        enc = tok(self.prompts, padding=True, padding_side="left", return_tensors="pt")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=RESPONSE_LENGTH,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        model.train(was_training)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def score(self, model) -> dict:
        """`bleu` (corpus) and `sentence_bleu` (mean sentence BLEU, the reward's view) on 0-100; `exact_match` (%)
        and `length_ratio` (output words / reference words), which show whether BLEU rose by getting answers right
        or by gaming the metric (short, safe answers); and the `outputs`."""
        import sacrebleu

        outputs = self.generate(model)
        n = len(outputs)
        corpus = sacrebleu.corpus_bleu(outputs, [self.references]).score
        sentence = sum(sacrebleu.sentence_bleu(o, [r]).score for o, r in zip(outputs, self.references)) / n
        exact = 100.0 * sum(o == r for o, r in zip(outputs, self.references)) / n
        ratio = sum(len(o.split()) for o in outputs) / sum(len(r.split()) for r in self.references)
        return {
            "bleu": corpus,
            "sentence_bleu": sentence,
            "exact_match": exact,
            "length_ratio": ratio,
            "outputs": outputs,
        }

    @staticmethod
    def record(scores: dict, iteration: int, step: int) -> dict:
        return {"kind": "eval", "iteration": iteration, "step": step} | {
            f"heldout/{k}": v for k, v in scores.items() if k != "outputs"
        }


# -- 1. supervised warm start ------------------------------------------------------------------------------------
def sft_settings(settings: DemoSize, seed: int) -> dict:
    """What the warm start depends on: its cache key."""
    import transformers

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "sft_examples", "sft_steps", "sft_batch_size")
    return {
        "demo_version": DEMO_VERSION,
        "task_seed": TASK_SEED,
        "seed": seed,
        "sft_learning_rate": settings.sft_learning_rate,
        "transformers_major": transformers.__version__.split(".")[0],
        **{k: getattr(settings, k) for k in keys},
    }


def sft_cache_path(cache_dir: str, settings: DemoSize, seed: int) -> str:
    digest = hashlib.sha256(json.dumps(sft_settings(settings, seed), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"demo-sft-{digest}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "demo_sft.json"))


def train_sft(path: str, config: DemoConfig, device: str, splits: demo_task.TaskSplits) -> None:
    """Train the partial warm start with `SFTTrainer` and save model + tokenizer at `path` (written atomically)."""
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from .tiny import build_tiny_model, build_tokenizer

    settings = config.settings
    tokenizer = build_tokenizer(demo_task.tokenizer_corpus())
    model = build_tiny_model(
        tokenizer,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        seed=config.seed,
    )
    data = Dataset.from_dict(demo_task.rows(splits.sft, completion=True)).remove_columns("reference")
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    args = SFTConfig(
        output_dir=tmp,
        max_steps=settings.sft_steps,
        per_device_train_batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate,
        lr_scheduler_type="constant",
        max_length=32,
        bf16=False,  # TRL's default bf16 autocast adds nothing on a model this small
        activation_checkpointing=False,  # SFTConfig turns it on by default; pure overhead here
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        use_cpu=device == "cpu",
        disable_tqdm=not config.progress,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_callback(ProgressCallback, "SFT warm start"))
    else:
        quiet(trainer)
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "demo_sft.json"), "w") as f:
        json.dump(sft_settings(settings, config.seed), f, indent=2)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(tmp, path)


def warm_start(config: DemoConfig, device: str, splits) -> tuple[str, bool]:
    """The path of the warm-start model, trained now or reused from the cache; and whether it was cached."""
    cache_dir = config.cache_dir or default_cache_dir()
    path = sft_cache_path(cache_dir, config.settings, config.seed)
    if config.use_cache and _is_complete(path):
        return path, True
    try:
        train_sft(path, config, device, splits)
    except PermissionError as err:
        raise CLIError(f"cannot write the warm-start cache at {path}: {err}", "pass a writable --cache_dir") from err
    return path, False


# -- 2. PPO ------------------------------------------------------------------------------------------------------
def ppo_config(config: DemoConfig, device: str):
    """PPO settings tuned for the demo: held-out BLEU 33-40 -> 88-91 over seeds 0-4 (see docs/quickstart.md)."""
    from .config import PPOConfig

    s = config.settings
    steps_per_rollout = s.num_ppo_epochs * s.num_mini_batches
    return PPOConfig(
        output_dir=config.output_dir,
        total_episodes=s.iterations * s.per_device_train_batch_size * s.num_mini_batches,
        per_device_train_batch_size=s.per_device_train_batch_size,
        num_mini_batches=s.num_mini_batches,
        num_ppo_epochs=s.num_ppo_epochs,
        # a 60k-parameter model trained from scratch moves slowly at LLM learning rates (1e-6); the clip range and
        # the KL penalty keep each update small anyway
        learning_rate=s.learning_rate,
        response_length=RESPONSE_LENGTH,
        max_prompt_length=8,
        # 0.7 keeps rollouts close to the greedy answer the held-out score measures; at 1.0 the first iterations
        # dropped held-out BLEU by 10-20 points before climbing
        temperature=0.7,
        # sentence BLEU pays for short, safe answers (the brevity penalty costs less than a wrong last word): at
        # kl_coef=0.01 the policy learned to stop after "... hundred" and stalled at BLEU 64 (length ratio 0.77,
        # exact answers 4% -> 7%); 0.05 makes that costly and the policy fixes its words instead (BLEU 88-91,
        # exact answers 53-63%, length ratio 0.96-1.00 over seeds 0-4)
        kl_coef=0.05,
        lam=0.95,  # the actor's; the critic uses the default lam_critic=1.0 (chosen in docs/learning.md)
        gamma=1.0,
        value_head="separate",  # the critic starts as a copy of the warm-started backbone
        logging_steps=steps_per_rollout,  # one log record per PPO iteration
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=config.seed,
        use_cpu=device == "cpu",
        disable_tqdm=not config.progress,
    )


# -- 3. outputs --------------------------------------------------------------------------------------------------
def train_ppo(config: DemoConfig, device: str, splits, policy, tokenizer, evaluator: HeldoutBleu, before: dict):
    """PPO from the warm start, writing `metrics.jsonl` as it goes; returns the trained policy and the records."""
    from datasets import Dataset

    from .callbacks import IterationProgressCallback
    from .rewards import BleuReward
    from .trainer import PPOTrainer

    settings = config.settings
    records: list[dict] = []
    with open(os.path.join(config.output_dir, "metrics.jsonl"), "w") as metrics_file:
        report = None if config.progress else print  # quiet: one line per held-out evaluation, nothing else
        callback = make_demo_callback(
            evaluator, settings.eval_every, settings.iterations, records, metrics_file, report=report
        )
        callback._write(evaluator.record(before, 0, 0))
        callback.latest = before["bleu"]
        trainer = PPOTrainer(
            policy,
            BleuReward(),
            args=ppo_config(config, device),
            train_dataset=Dataset.from_dict(demo_task.rows(splits.ppo)),
            processing_class=tokenizer,
            callbacks=[callback],
        )
        if config.progress:
            trainer.remove_callback(IterationProgressCallback)

            def postfix(logs):
                return {
                    "reward": f"{logs['objective/scores']:.3f}",
                    "kl": f"{logs.get('objective/kl', 0.0):.2f}",
                    "heldout_bleu": f"{callback.latest:.1f}",
                }

            trainer.add_callback(progress_callback(IterationProgressCallback, "PPO", postfix))
        else:
            quiet(trainer)
        trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model).policy, records


def write_outputs(config: DemoConfig, device: str, result: DemoResult) -> None:
    plot_curves(result.records, result.plot_path)
    summary = {k: v for k, v in asdict(result).items() if k != "records"}
    summary.update(config=asdict(config), settings=asdict(config.settings), device=device)
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Warm start (cached), PPO, outputs; prints progress and the `held-out BLEU: a -> b` line last."""
    config = config or DemoConfig()
    start = time.perf_counter()
    device = resolve_device(config.device)
    try:
        os.makedirs(config.output_dir, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --output_dir {config.output_dir}: {err}", "pass a writable directory") from err
    print(
        f"trl-gae demo: PPO + GAE teaches a tiny Llama to spell numbers ('4721' -> "
        f"'{demo_task.number_to_words(4721)}'), reward = BLEU. device={device}, seed={config.seed}"
    )
    with quiet_libraries(config.num_threads or (1 if device == "cpu" else None)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        splits = build_splits(config.settings)
        sft_dir, cached = warm_start(config, device, splits)
        print(f"warm start: {'reused' if cached else 'trained and cached'} {sft_dir}")
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        # loaded from disk even right after training: a model that went through another Trainer keeps a patched
        # `forward`, which the PPO reference copy would share
        policy = AutoModelForCausalLM.from_pretrained(sft_dir)
        evaluator = HeldoutBleu(tokenizer, splits.heldout)
        before = evaluator.score(policy)
        policy, records = train_ppo(config, device, splits, policy, tokenizer, evaluator, before)
        after = evaluator.score(policy)
        model_dir = os.path.join(config.output_dir, "model")
        policy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)

    result = DemoResult(
        bleu_before=before["bleu"],
        bleu_after=after["bleu"],
        sentence_bleu_before=before["sentence_bleu"],
        sentence_bleu_after=after["sentence_bleu"],
        seconds=time.perf_counter() - start,
        sft_cached=cached,
        sft_dir=sft_dir,
        output_dir=config.output_dir,
        metrics_path=os.path.join(config.output_dir, "metrics.jsonl"),
        plot_path=os.path.join(config.output_dir, "reward_curve.png"),
        model_dir=model_dir,
        records=records,
    )
    write_outputs(config, device, result)
    print_samples(evaluator, before["outputs"], after["outputs"])
    print(
        f"exact answers: {before['exact_match']:.1f}% -> {after['exact_match']:.1f}%; "
        f"output/reference length: {before['length_ratio']:.2f} -> {after['length_ratio']:.2f}"
    )
    print(f"wrote {result.metrics_path}, {result.plot_path}, {model_dir}/ in {result.seconds:.0f} s")
    print(result.summary_line(config.settings.heldout))
    return result


# -- command line ------------------------------------------------------------------------------------------------
def build_demo_parser(prog: str = "trl-gae demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Built-in offline demo: a tiny model learns to spell numbers, SFT warm start then PPO + GAE "
        "with a BLEU reward. `trl-gae ppo` with no model/dataset arguments runs it too.",
        allow_abbrev=False,
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long reduced run (what the tests run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, warm start and PPO (default 0)")
    parser.add_argument(
        "--output_dir", "--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default ./{DEFAULT_OUTPUT_DIR}"
    )
    parser.add_argument(
        "--cache_dir", "--cache-dir", default=None, help=f"warm-start cache (default {default_cache_dir()})"
    )
    parser.add_argument(
        "--no_cache", "--no-cache", action="store_true", help="retrain the warm start even if it is cached"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps")
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations (default 200; 2 with --smoke)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1, see the docs)")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        size="smoke" if args.smoke else "full",
        seed=args.seed,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        device=args.device,
        iterations=args.iterations,
        num_threads=args.threads,
        progress=not args.no_progress,
    )


def demo_main(argv: list[str] | None = None, prog: str = "trl-gae demo") -> int:
    parser = build_demo_parser(prog)
    args, unknown = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if unknown:
        raise CLIError(
            f"{prog} does not take {' '.join(unknown)}: with no --model_name_or_path, --dataset_name or --config, "
            "`trl-gae ppo` runs the built-in demo",
            "to train your own model pass --model_name_or_path and --dataset_name (see `trl-gae ppo --help`); "
            "demo options are listed by `trl-gae demo --help`",
        )
    run_demo(config_from_args(args))
    return 0
