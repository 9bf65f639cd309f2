"""Learning per completion: this package's PPO + GAE against TRL's GRPOTrainer and RLOOTrainer on equal budgets.

    python benchmarks/learning.py                  # 9 methods x 3 seeds, ~11 min on 2 CPU cores (2 runs at a time)
    python benchmarks/learning.py --quick          # seconds: smoke-sized, 3 methods, 1 seed (run by the tests)
    python benchmarks/learning.py --report-only    # redraw the table and plot from the saved runs

Task: the built-in demo's (`trl_gae_ext.demo_task`): spell an integer 0-9999 in English words, reward = sentence
BLEU (`BleuReward`, 0-1) against the reference. Every method starts from the same supervised warm start of its
seed (the demo's, cached), sees the same prompts, and gets the same number of **generated completions**, counted
by the reward function itself (every completion any trainer generates is scored exactly once).

Every method also gets the same optimisation per batch: 64 completions per generation, split into 2 minibatches of
32, 4 passes (PPO's `num_ppo_epochs=4, num_mini_batches=2`; GRPO's and RLOO's `steps_per_generation=2,
num_iterations=4`): 8 AdamW steps per 64 completions, learning rate 1e-3 decaying linearly, temperature 0.7,
KL coefficient 0.05 to the warm start (PPO: k1 in the reward; GRPO: k3 in the loss; RLOO: in the reward, TRL's
defaults for where it goes). Everything else is each trainer's default.

Measured every `--eval-every` batches and at the end, on 300 held-out numbers never trained on:
- held-out BLEU: greedy decoding, corpus BLEU (sacrebleu, 0-100), and exact answers (%);
- KL to the warm start: responses sampled at temperature 1 from the trained policy, the exact per-token
  KL(policy || start) over the vocabulary summed along each response, averaged over the prompts (nats/sequence);
- wall time of training alone (evaluations excluded); runs share the machine (`--jobs`), so compare within a run.

Each finished run is saved at once to `<out>/runs/<method>-seed<k>.json` (a crash loses only runs in flight;
`--resume` skips finished ones). The report (`<out>/learning.md` table, `<out>/learning.png` curves) gives, per
method, the mean and spread over seeds, and the completions PPO needed to reach GRPO's final held-out BLEU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context


COMPLETIONS_PER_BATCH = 64
MINIBATCHES = 2
PASSES = 4
STEPS_PER_BATCH = MINIBATCHES * PASSES
LEARNING_RATE = 1e-3
TEMPERATURE = 0.7
KL_COEF = 0.05


@dataclass(frozen=True)
class Method:
    """One contender: `kind` is ppo, grpo or rloo; `options` go into its config."""

    name: str
    kind: str
    label: str
    options: dict = field(default_factory=dict)


# fmt: off
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("ppo", "ppo", "PPO+GAE lambda actor 0.95 / critic 1.0 (package default)"),
    Method("ppo-scaled", "ppo", "PPO+GAE default + scale_scores (scores / rollout std)", {"scale_scores": "batch"}),
    Method("ppo-first", "ppo", "PPO+GAE default + scale_scores='first' (scores / first std)", {"scale_scores": "first"}),
    Method(
        "ppo-first-kl02", "ppo", "PPO+GAE default + scale_scores='first', kl_coef 0.2",
        {"scale_scores": "first", "kl_coef": 0.2},
    ),
    Method(
        "ppo-first-kl03", "ppo", "PPO+GAE default + scale_scores='first', kl_coef 0.3",
        {"scale_scores": "first", "kl_coef": 0.3},
    ),
    Method(
        "ppo-first-kl03-noclip", "ppo", "PPO+GAE default + scale_scores='first', kl_coef 0.3, no value clipping",
        {"scale_scores": "first", "kl_coef": 0.3, "cliprange_value": None},
    ),
    Method(
        "ppo-critic-old", "ppo", "PPO+GAE default, critic as before issue 12 (random head, no return scale)",
        {"value_head_init_std": None, "value_head_return_scale": False},
    ),
    Method("ppo-zero-head", "ppo", "PPO+GAE default, zero head without return scale", {"value_head_return_scale": False}),
    Method("ppo-lam095", "ppo", "PPO+GAE lambda 0.95 for both (TRL 1.12)", {"lam": 0.95, "lam_critic": None}),
    Method("ppo-lam1", "ppo", "PPO+GAE lambda 1.0 for both", {"lam": 1.0, "lam_critic": None}),
    Method("ppo-warmup", "ppo", "PPO+GAE default, critic warm-up 5 batches", {"critic_warmup_steps": 5}),
    Method("grpo-g4", "grpo", "TRL GRPO, group 4", {"num_generations": 4}),
    Method("grpo-g8", "grpo", "TRL GRPO, group 8", {"num_generations": 8}),
    # GRPO's fixes for what the first full run showed (short answers that game BLEU's brevity penalty): TRL's own
    # default beta 0, and Dr. GRPO (no per-group std scaling, constant length normalisation)
    Method("grpo-g4-beta0", "grpo", "TRL GRPO, group 4, beta 0 (TRL default)", {"num_generations": 4, "beta": 0.0}),
    Method(
        "grpo-g4-dr", "grpo", "TRL Dr. GRPO, group 4",
        {"num_generations": 4, "loss_type": "dr_grpo", "scale_rewards": "none"},
    ),
    Method("rloo-k4", "rloo", "TRL RLOO, k 4", {"num_generations": 4}),
]}
# fmt: on
QUICK_METHODS = ("ppo", "grpo-g4", "rloo-k4")
# the 2026-12-03 variants (score scaling, critic heads) run on request: `--methods ppo-scaled ...`
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("ppo-scaled", "ppo-critic-old", "ppo-zero-head"))


# -- measurements ------------------------------------------------------------------------------------------------
class CountingReward:
    """`BleuReward` that counts the completions it scores: the budget every method is held to."""

    def __init__(self):
        from trl_gae_ext.rewards import BleuReward

        self.inner = BleuReward()
        self.__name__ = "bleu"
        self.count = 0

    def __call__(self, prompts, completions, **kwargs):
        self.count += len(completions)
        return self.inner(prompts, completions, **kwargs)


def kl_to_start(policy, start, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> float:
    """Mean over `prompts` of sum_t KL(policy(.|s_t) || start(.|s_t)) along responses sampled from `policy` at
    temperature 1 (nats per sequence): an unbiased estimate of the sequence-level KL that uses the exact per-token
    KL instead of the log-ratio of the sampled token, so it needs few samples."""
    import torch

    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    was_training = policy.training
    policy.eval()
    # its own random stream: measuring during training must not change what the trainer samples next
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = policy.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        response = out[:, prompt_len:]
        # a response ends at its first EOS (included); generate pads after it
        is_eos = response == tokenizer.eos_token_id
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        response_mask = ~after_eos
        attention = torch.cat([enc["attention_mask"], response_mask.long()], dim=1)
        position_ids = (attention.cumsum(1) - 1).clamp(min=0)
        logits = []
        for model in (policy, start):
            logits.append(model(input_ids=out, attention_mask=attention, position_ids=position_ids).logits)
        logp, logq = (torch.log_softmax(x[:, prompt_len - 1 : -1].float(), -1) for x in logits)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
        kl = (per_token * response_mask).sum(1).mean().item()
    policy.train(was_training)
    return kl


# -- one run -----------------------------------------------------------------------------------------------------
def _common_args(out_dir: str, seed: int) -> dict:
    return dict(
        output_dir=out_dir,
        learning_rate=LEARNING_RATE,
        temperature=TEMPERATURE,
        seed=seed,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=STEPS_PER_BATCH,
    )


def build_trainer(method: Method, policy, tokenizer, dataset, reward, budget: int, seed: int, out_dir: str, callback):
    from trl_gae_ext.demo import RESPONSE_LENGTH

    common = _common_args(out_dir, seed)
    if method.kind == "ppo":
        from trl_gae_ext import PPOConfig, PPOTrainer

        args = PPOConfig(
            **common,
            total_episodes=budget,
            per_device_train_batch_size=COMPLETIONS_PER_BATCH // MINIBATCHES,
            num_mini_batches=MINIBATCHES,
            num_ppo_epochs=PASSES,
            response_length=RESPONSE_LENGTH,
            max_prompt_length=8,
            gamma=1.0,
            value_head="separate",
            **({"kl_coef": KL_COEF} | method.options),
        )
        return PPOTrainer(
            policy, reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]
        )
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if method.kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(
        **common,
        max_steps=budget // COMPLETIONS_PER_BATCH * STEPS_PER_BATCH,
        per_device_train_batch_size=COMPLETIONS_PER_BATCH // MINIBATCHES,
        steps_per_generation=MINIBATCHES,
        num_iterations=PASSES,
        max_completion_length=RESPONSE_LENGTH,
        **({"beta": KL_COEF} | method.options),
    )
    return trainer_cls(
        policy, reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]
    )


def run_one(method_name: str, seed: int, size: str, budget: int, eval_every: int, cache_dir: str | None, out: str):
    """Train one method from its seed's warm start; returns (and saves) its evaluation records."""
    import datasets
    import torch

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback, set_seed
    from transformers.utils import logging as hf_logging

    from trl_gae_ext import demo, demo_task
    from trl_gae_ext.demo import HeldoutBleu

    hf_logging.set_verbosity_error()
    method = METHODS[method_name]
    splits, sft_dir = warm_start_of(size, seed, cache_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    start = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    set_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    evaluator = HeldoutBleu(tokenizer, splits.heldout)

    dataset = Dataset.from_dict(demo_task.rows(splits.ppo))
    reward = CountingReward()
    records: list[dict] = []
    clock = {"train": 0.0, "since": 0.0}
    batches = budget // COMPLETIONS_PER_BATCH

    def evaluate(model, batch: int) -> None:
        scores = evaluator.score(model)
        kl = kl_to_start(model, start, tokenizer, evaluator.prompts, demo.RESPONSE_LENGTH, seed=1000 + batch)
        records.append(
            {
                "batch": batch,
                "completions": reward.count,
                "bleu": scores["bleu"],
                "exact_match": scores["exact_match"],
                "length_ratio": scores["length_ratio"],
                "kl": kl,
                "train_seconds": clock["train"],
            }
        )

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["since"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % STEPS_PER_BATCH:
                return  # evaluate only once every minibatch of the batch has been trained on
            batch = state.global_step // STEPS_PER_BATCH
            if batch % eval_every == 0 or batch == batches:
                clock["train"] += time.perf_counter() - clock["since"]
                evaluate(getattr(model, "policy", model), batch)
                clock["since"] = time.perf_counter()

    evaluate(policy, 0)
    scratch = os.path.join(out, "tmp", f"{method.name}-seed{seed}")  # the trainer's output_dir; nothing is kept
    trainer = build_trainer(method, policy, tokenizer, dataset, reward, budget, seed, scratch, EvalCallback())
    trainer.remove_callback(PrinterCallback)  # the logs are the trainers' own business here; we print a line per run
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "method": method.name,
        "label": method.label,
        "seed": seed,
        "budget": budget,
        "size": size,
        "records": records,
        "train_seconds": clock["train"],
        "score_scale": getattr(trainer.model, "score_scale", None),  # PPO with scale_scores="first"
    }
    path = run_path(out, method.name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def run_path(out: str, method: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{method}-seed{seed}.json")


# -- report ------------------------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def completions_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Completions at which a (completions, bleu) curve first reaches `target`, interpolated linearly between
    evaluations; None if it never does."""
    for (c0, b0), (c1, b1) in zip(curve, curve[1:]):
        if b1 >= target:
            if b0 >= target:
                return float(c0)
            return c0 + (c1 - c0) * (target - b0) / (b1 - b0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def mean_curve(runs: list[dict], key: str = "bleu") -> list[tuple[int, float]]:
    """Seed-mean of `key` at each evaluation point (all runs of a method evaluate at the same completions)."""
    points = [[(r["completions"], r[key]) for r in run["records"]] for run in runs]
    n = min(len(p) for p in points)
    return [(points[0][i][0], statistics.fmean(p[i][1] for p in points)) for i in range(n)]


def summarise(runs: list[dict]) -> dict:
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {}
    for name, group in by_method.items():
        finals = [g["records"][-1] for g in group]
        rows[name] = {
            "label": group[0]["label"],
            "seeds": sorted(g["seed"] for g in group),
            "completions": finals[0]["completions"],
            "bleu_start": _mean_sd([g["records"][0]["bleu"] for g in group]),
            "bleu": _mean_sd([f["bleu"] for f in finals]),
            "exact_match": _mean_sd([f["exact_match"] for f in finals]),
            "length_ratio": _mean_sd([f["length_ratio"] for f in finals]),
            "kl": _mean_sd([f["kl"] for f in finals]),
            "train_seconds": _mean_sd([g["train_seconds"] for g in group]),
            "curve": mean_curve(group),
        }
    grpo = [n for n in rows if n.startswith("grpo")]
    if grpo:
        best = max(grpo, key=lambda n: rows[n]["bleu"][0])
        target = rows[best]["bleu"][0]
        for row in rows.values():
            reached = completions_to_reach(row["curve"], target)
            row["target"] = {"method": best, "bleu": target}
            row["to_target"] = reached
            row["to_target_ratio"] = None if reached is None else reached / rows[best]["completions"]
    return rows


def render_markdown(rows: dict, meta: dict) -> str:
    fmt = "{:.1f} ± {:.1f}"
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; command: `{meta['command']}`; "
        f"seeds {meta['seeds']}; {meta['budget']} completions per run.",
        "",
        "| method | held-out BLEU start → end | exact answers % | length ratio | KL to start (nats/seq) "
        "| completions to reach best GRPO final BLEU | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        reach = "never" if r.get("to_target") is None else f"{r['to_target']:.0f} ({r['to_target_ratio']:.2f}x)"
        if "target" not in r:
            reach = "n/a"
        lines.append(
            f"| {r['label']} | {r['bleu_start'][0]:.1f} → {fmt.format(*r['bleu'])} | {fmt.format(*r['exact_match'])} "
            f"| {r['length_ratio'][0]:.2f} | {r['kl'][0]:.2f} ± {r['kl'][1]:.2f} | {reach} "
            f"| {r['train_seconds'][0]:.1f} ± {r['train_seconds'][1]:.1f} |"
        )
    if rows and "target" in next(iter(rows.values())):
        t = next(iter(rows.values()))["target"]
        lines += ["", f"Target: the best GRPO's final held-out BLEU, {t['bleu']:.1f} ({t['method']}, seed mean)."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, (name, group) in enumerate(by_method.items()):
        style = "-" if name.startswith("ppo") else "--"
        color = f"C{i}"
        for ax, key in zip(axes, ("bleu", "kl")):
            curve = mean_curve(group, key)
            xs = [c for c, _ in curve]
            ax.plot(xs, [v for _, v in curve], style, color=color, label=group[0]["label"], marker=".")
            if len(group) > 1:
                lo = [min(r["records"][j][key] for r in group) for j in range(len(xs))]
                hi = [max(r["records"][j][key] for r in group) for j in range(len(xs))]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
    axes[0].set_title("held-out BLEU (greedy, corpus, 0-100): seed mean, band = min-max")
    axes[1].set_title("KL to the warm start (nats / sequence)")
    for ax in axes:
        ax.set_xlabel("generated completions")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str, methods: list[str], seeds: list[int], meta: dict) -> dict:
    runs = []
    for m in methods:
        for s in seeds:
            if os.path.exists(run_path(out, m, s)):
                with open(run_path(out, m, s)) as f:
                    runs.append(json.load(f))
    rows = summarise(runs)
    table = render_markdown(rows, meta)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "methods": rows}, f, indent=1)
    plot(runs, os.path.join(out, "learning.png"))
    print(table)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized model, 3 methods, 1 seed, 128 completions")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        help="default: all but the 2026-12-03 variants (quick: ppo, grpo, rloo)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--budget", type=int, default=None, help="completions per run (default 12800; quick 128)")
    parser.add_argument("--eval-every", type=int, default=None, help="batches of 64 between evaluations (10)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--out", default="benchmarks/results/learning")
    parser.add_argument("--cache-dir", default=None, help="warm-start cache (default: the demo's)")
    parser.add_argument("--resume", action="store_true", help="skip runs whose results are already saved")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    size = "smoke" if args.quick else "full"
    methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    budget = args.budget or (2 * COMPLETIONS_PER_BATCH if args.quick else 12800)
    eval_every = args.eval_every or (1 if args.quick else 10)
    if budget % COMPLETIONS_PER_BATCH:
        parser.error(f"--budget must be a multiple of {COMPLETIONS_PER_BATCH} (completions per batch)")
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.jobs} runs at a time",
        "command": "python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": seeds,
        "budget": budget,
    }
    if not args.report_only:
        todo = [
            (m, s) for s in seeds for m in methods if not (args.resume and os.path.exists(run_path(args.out, m, s)))
        ]
        started = time.perf_counter()
        job = (size, budget, eval_every, args.cache_dir, args.out)
        if args.jobs == 1:
            for i, (m, s) in enumerate(todo):
                result = run_one(m, s, *job)
                _progress(i + 1, len(todo), result, started)
        else:
            # warm starts first, one per seed, so parallel runs do not train the same one twice
            for s in seeds:
                warm_start_of(size, s, args.cache_dir, args.out)
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_one, m, s, *job) for m, s in todo]
                for i, future in enumerate(futures):
                    _progress(i + 1, len(todo), future.result(), started)
        meta["wall_seconds"] = time.perf_counter() - started
    return report(args.out, methods, seeds, meta)


def task_splits(settings):
    """The demo's split of 0-9999 (same held-out and warm-start numbers), with at least two batches of prompts."""
    from trl_gae_ext import demo, demo_task

    ppo_prompts = max(settings.ppo_prompts, 2 * COMPLETIONS_PER_BATCH)
    return demo_task.make_splits(settings.sft_examples, ppo_prompts, settings.heldout, seed=demo.TASK_SEED)


def warm_start_of(size: str, seed: int, cache_dir: str | None, out: str):
    """The task split and the path of the seed's supervised warm start (the demo's, trained once and cached)."""
    from trl_gae_ext.demo import DemoConfig, warm_start

    config = DemoConfig(size=size, seed=seed, cache_dir=cache_dir, progress=False, output_dir=out)
    splits = task_splits(config.settings)
    sft_dir, _ = warm_start(config, "cpu", splits)
    return splits, sft_dir


def _progress(done: int, total: int, result: dict, started: float) -> None:
    last = result["records"][-1]
    print(
        f"[{done}/{total}] {result['method']} seed {result['seed']}: BLEU {result['records'][0]['bleu']:.1f} -> "
        f"{last['bleu']:.1f}, KL {last['kl']:.2f}, {result['train_seconds']:.0f} s "
        f"({math.floor(time.perf_counter() - started)} s elapsed)",
        flush=True,
    )


if __name__ == "__main__":
    main()
