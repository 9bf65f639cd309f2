"""Translation on a real model: this package's PPO + GAE against TRL's GRPOTrainer and RLOOTrainer on equal budgets.

    python benchmarks/real_translation.py                 # ppo, grpo-g4, rloo-k4 x seeds 0 1, 256 completions each
    python benchmarks/real_translation.py --quick         # about a minute: smoke-sized, 3 methods, 1 seed
    python benchmarks/real_translation.py --report-only   # redraw the table and plot from the saved runs

Task: German -> English on the Ding dictionary's example sentences (`trl_gae_ext.assets`: 200 pairs held out by hash,
never trained on), SmolLM2-135M-Instruct (fp32, from the offline GGUF) with a LoRA adapter (r 16, alpha 32, every
linear layer), reward = sentence BLEU against the reference (`BleuReward`, 0-1). Every method starts from the same
model, sees the same prompts and gets the same number of **generated completions**, counted by the reward function
itself (each trainer scores every completion it generates exactly once).

Every method gets the same optimisation per batch: 16 completions per generation, 2 minibatches of 8, 2 passes
(PPO's `num_ppo_epochs=2, num_mini_batches=2`; GRPO's and RLOO's `steps_per_generation=2, num_iterations=2`): 4 AdamW
steps per 16 completions at learning rate 2e-4 (decaying linearly), temperature 0.7, at most 32 new tokens, KL
coefficient 0.05 to the start model (PPO: k1 in the reward; GRPO: k3 in the loss; RLOO: in the reward: each trainer's
own default for where it goes). Everything else is each trainer's default; PPO's critic is its `adapter` layout (a
second LoRA adapter on the same base, with the package's value head).

Measured before training, every `--eval-every` batches and at the end:
- held-out greedy corpus BLEU and chrF (sacrebleu, 0-100) and the output/reference length ratio (BLEU's);
- KL to the start model: the exact per-token KL(policy || start) summed along responses sampled at temperature 1 on
  `kl_prompts` held-out prompts (nats/sequence, `benchmarks/learning.py`'s estimator; start = adapters disabled);
- training wall time (evaluations excluded; runs share the machine, `--jobs`), and for PPO the critic's explained
  variance at every rollout.

Each finished run is saved at once to `<out>/runs/<method>-seed<k>.json` (`--resume` skips them). The report
(`<out>/real_translation.md`, `<out>/real_translation.png`) gives per method and seed the final numbers, the
completions each method needed to reach the best GRPO's final held-out BLEU, and a few completions before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learning  # noqa: E402  (the sibling benchmark: budget counting, KL estimator, curve statistics)


MINIBATCHES = 2
PASSES = 2
STEPS_PER_BATCH = MINIBATCHES * PASSES
LEARNING_RATE = 2e-4
TEMPERATURE = 0.7
KL_COEF = 0.05
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


@dataclass(frozen=True)
class Size:
    batch: int  # completions per generation
    budget: int  # completions per run
    eval_every: int  # batches between held-out evaluations
    heldout: int  # held-out pairs scored
    kl_prompts: int  # held-out prompts of the KL estimate
    response_length: int


SIZES = {
    "full": Size(batch=16, budget=256, eval_every=4, heldout=200, kl_prompts=32, response_length=32),
    "quick": Size(batch=4, budget=8, eval_every=1, heldout=8, kl_prompts=4, response_length=8),
}


@dataclass(frozen=True)
class Method:
    """One contender: `kind` is ppo, grpo or rloo; `options` go into its config."""

    name: str
    kind: str
    label: str
    options: dict = field(default_factory=dict)


# fmt: off
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("ppo", "ppo", "PPO+GAE, package defaults"),
    Method("ppo-return-scale", "ppo", "PPO+GAE + value_head_return_scale", {"value_head_return_scale": True}),
    Method(
        "ppo-scaled", "ppo", "PPO+GAE + value_head_return_scale + scale_scores",
        {"value_head_return_scale": True, "scale_scores": "batch"},
    ),
    Method("ppo-first", "ppo", "PPO+GAE + scale_scores='first'", {"scale_scores": "first"}),
    Method(
        "ppo-first-kl02", "ppo", "PPO+GAE + scale_scores='first', kl_coef 0.2",
        {"scale_scores": "first", "kl_coef": 0.2},
    ),
    Method(
        "ppo-first-kl03", "ppo", "PPO+GAE + scale_scores='first', kl_coef 0.3",
        {"scale_scores": "first", "kl_coef": 0.3},
    ),
    Method("grpo-g4", "grpo", "TRL GRPO, group 4", {"num_generations": 4}),
    Method(
        "grpo-g4-dr", "grpo", "TRL Dr. GRPO, group 4",
        {"num_generations": 4, "loss_type": "dr_grpo", "scale_rewards": "none"},
    ),
    Method("rloo-k4", "rloo", "TRL RLOO, k 4", {"num_generations": 4}),
]}
# fmt: on
DEFAULT_METHODS = QUICK_METHODS = ("ppo", "grpo-g4", "rloo-k4")  # `--methods` adds the others
EXAMPLES_SHOWN = 4


# -- measurements ------------------------------------------------------------------------------------------------
class AdaptersOff:
    """The start model as a callable: the PEFT policy with every adapter disabled (LoRA starts as a zero update)."""

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


def chat_texts(tokenizer, prompts: list) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def greedy_outputs(model, tokenizer, texts: list[str], max_new_tokens: int, chunk: int = 50) -> list[str]:
    """Greedy completions (up to the first EOS) of chat-templated prompts, in chunks of `chunk`."""
    import torch

    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(texts), chunk):
            enc = tokenizer(
                texts[i : i + chunk], padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return [o.strip() for o in outputs]


def translation_scores(outputs: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (0-100) and BLEU's output/reference length ratio."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(outputs, [references])
    chrf = sacrebleu.corpus_chrf(outputs, [references])
    return {"bleu": bleu.score, "chrf": chrf.score, "length_ratio": bleu.sys_len / max(bleu.ref_len, 1)}


def kl_chunked(policy, tokenizer, texts: list[str], max_new_tokens: int, seed: int, chunk: int = 8) -> float:
    """`learning.kl_to_start` over chunks of `chunk` prompts (full-vocabulary logits of a 49k vocabulary are large),
    the start model being `policy` with its adapters disabled. Equal chunks, so the mean of means is the mean."""
    start = AdaptersOff(policy)
    parts = [
        learning.kl_to_start(policy, start, tokenizer, texts[i : i + chunk], max_new_tokens, seed=seed + i)
        for i in range(0, len(texts), chunk)
    ]
    return statistics.fmean(parts)


# -- one run -----------------------------------------------------------------------------------------------------
def build_trainer(method: Method, model, tokenizer, dataset, reward, size: Size, seed: int, out_dir: str, callback):
    from peft import LoraConfig

    common = dict(
        output_dir=out_dir, learning_rate=LEARNING_RATE, temperature=TEMPERATURE, seed=seed, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=STEPS_PER_BATCH,
        per_device_train_batch_size=size.batch // MINIBATCHES,
    )  # fmt: skip
    lora = LoraConfig(**LORA)
    if method.kind == "ppo":
        from trl_gae_ext import PPOConfig, PPOTrainer

        args = PPOConfig(
            **common, total_episodes=size.budget, num_mini_batches=MINIBATCHES, num_ppo_epochs=PASSES,
            response_length=size.response_length, max_prompt_length=128, value_head="adapter",
            **({"kl_coef": KL_COEF} | method.options),
        )  # fmt: skip
        return PPOTrainer(
            model, reward, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
            callbacks=[callback],
        )  # fmt: skip
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if method.kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(
        **common, max_steps=size.budget // size.batch * STEPS_PER_BATCH, steps_per_generation=MINIBATCHES,
        num_iterations=PASSES, max_completion_length=size.response_length, **({"beta": KL_COEF} | method.options),
    )  # fmt: skip
    return trainer_cls(
        model, reward, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
        callbacks=[callback],
    )  # fmt: skip


def load_task(size: Size):
    """`(train, heldout)` datasets: the assets' split, with `size.heldout` of the 200 held-out pairs scored."""
    from trl_gae_ext.assets import translation_datasets

    train, heldout = translation_datasets(num_heldout=200)
    return train, heldout.select(range(size.heldout))


def start_record(size_name: str, out: str) -> dict:
    """The start model's held-out record (the same for every method and seed: greedy decoding of the same model),
    computed once and cached in `<out>/start-<size>.json`. Its KL to itself is 0."""
    path = os.path.join(out, f"start-{size_name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_gae_ext.assets import smollm2_path

    torch.set_num_threads(1)
    size = SIZES[size_name]
    _, heldout = load_task(size)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    outputs = greedy_outputs(model, tokenizer, chat_texts(tokenizer, heldout["prompt"]), size.response_length)
    record = {"batch": 0, "completions": 0, "kl": 0.0, "train_seconds": 0.0, "outputs": outputs}
    record.update(translation_scores(outputs, heldout["reference"]))
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return record


def run_one(method_name: str, seed: int, size_name: str, budget: int, out: str) -> dict:
    """Train one method from the start model; returns (and saves) its evaluation records."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback, set_seed
    from transformers.utils import logging as hf_logging

    from trl_gae_ext.assets import smollm2_path

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    method, size = METHODS[method_name], SIZES[size_name]
    size = Size(**{**size.__dict__, "budget": budget})
    train, heldout = load_task(size)
    texts = chat_texts(AutoTokenizer.from_pretrained(smollm2_path()), heldout["prompt"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    reward = learning.CountingReward()
    records = [{k: v for k, v in start_record(size_name, out).items() if k != "outputs"}]
    critic: list[dict] = []
    clock = {"train": 0.0, "since": 0.0}
    batches = size.budget // size.batch

    def evaluate(policy, batch: int) -> list[str]:
        outputs = greedy_outputs(policy, tokenizer, texts, size.response_length)
        record = {"batch": batch, "completions": reward.count, "train_seconds": clock["train"]}
        record.update(translation_scores(outputs, heldout["reference"]))
        record["kl"] = kl_chunked(policy, tokenizer, texts[: size.kl_prompts], size.response_length, 1000 + batch)
        records.append(record)
        return outputs

    final: dict[str, list[str]] = {}

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["since"] = time.perf_counter()

        def on_rollout_end(self, args, state, control, stats=None, **kwargs):  # PPO only
            critic.append({k: stats[k] for k in ("val/explained_var", "val/value_mean", "val/returns_mean")})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % STEPS_PER_BATCH:
                return  # evaluate only once every minibatch of the batch has been trained on
            batch = state.global_step // STEPS_PER_BATCH
            if batch % size.eval_every == 0 or batch == batches:
                clock["train"] += time.perf_counter() - clock["since"]
                final["outputs"] = evaluate(getattr(model, "policy", model), batch)
                clock["since"] = time.perf_counter()

    scratch = os.path.join(out, "tmp", f"{method.name}-seed{seed}")  # the trainer's output_dir; nothing is kept
    trainer = build_trainer(method, model, tokenizer, train, reward, size, seed, scratch, EvalCallback())
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "method": method.name, "label": method.label, "seed": seed, "budget": size.budget, "size": size_name,
        "records": records, "train_seconds": clock["train"], "critic": critic,
        "score_scale": getattr(trainer.model, "score_scale", None),  # PPO with scale_scores="first"
        "outputs": final.get("outputs", [])[:EXAMPLES_SHOWN],
    }  # fmt: skip
    path = learning.run_path(out, method.name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


# -- report ------------------------------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {}
    for name, group in by_method.items():
        finals = [g["records"][-1] for g in group]
        rows[name] = {
            "label": group[0]["label"],
            "seeds": [g["seed"] for g in group],
            "completions": finals[0]["completions"],
            "bleu_start": group[0]["records"][0]["bleu"],
            **{k: learning._mean_sd([f[k] for f in finals]) for k in ("bleu", "chrf", "length_ratio", "kl")},
            "train_seconds": learning._mean_sd([g["train_seconds"] for g in group]),
            "per_seed": {g["seed"]: {**g["records"][-1], "train_seconds": g["train_seconds"]} for g in group},
            "curve": learning.mean_curve(group),
        }
    grpo = [n for n in rows if n.startswith("grpo")]
    if grpo:
        best = max(grpo, key=lambda n: rows[n]["bleu"][0])
        target = rows[best]["bleu"][0]
        for row in rows.values():
            reached = learning.completions_to_reach(row["curve"], target)
            row["target"] = {"method": best, "bleu": target}
            row["to_target"] = reached
            row["to_target_ratio"] = None if reached is None else reached / rows[best]["completions"]
    return rows


def render_markdown(rows: dict, runs: list[dict], start: dict, heldout, meta: dict) -> str:
    fmt = "{:.2f} ± {:.2f}"
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; command: `{meta['command']}`; seeds {meta['seeds']}; "
        f"{meta['budget']} completions per run; {len(start['outputs'])} held-out pairs.",
        "",
        "| method | held-out BLEU start → end | chrF end | length ratio | KL to start (nats/seq) "
        "| completions to reach best GRPO final BLEU | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        reach = "n/a" if "target" not in r else "never" if r["to_target"] is None else (
            f"{r['to_target']:.0f} ({r['to_target_ratio']:.2f}x)"
        )  # fmt: skip
        lines.append(
            f"| {r['label']} | {r['bleu_start']:.2f} → {fmt.format(*r['bleu'])} | {fmt.format(*r['chrf'])} "
            f"| {r['length_ratio'][0]:.2f} | {r['kl'][0]:.2f} ± {r['kl'][1]:.2f} | {reach} "
            f"| {r['train_seconds'][0]:.0f} ± {r['train_seconds'][1]:.0f} |"
        )
    if rows and "target" in next(iter(rows.values())):
        t = next(iter(rows.values()))["target"]
        lines += ["", f"Target: the best GRPO's final held-out BLEU, {t['bleu']:.2f} ({t['method']}, seed mean)."]
    lines += ["", "Per seed (final):", "", "| method | seed | BLEU | chrF | length ratio | KL | train s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows.values():
        for seed, f in sorted(r["per_seed"].items()):
            lines.append(
                f"| {r['label']} | {seed} | {f['bleu']:.2f} | {f['chrf']:.1f} | {f['length_ratio']:.2f} "
                f"| {f['kl']:.2f} | {f['train_seconds']:.0f} |"
            )
    critic = [run for run in runs if run["critic"]]
    if critic:
        lines += ["", "PPO critic, explained variance per rollout (first seed of each method):", ""]
        for run in {r["method"]: r for r in reversed(critic)}.values():
            ev = ", ".join(f"{c['val/explained_var']:.2f}" for c in run["critic"])
            lines.append(f"- {run['label']}, seed {run['seed']}: {ev}")
    lines += ["", "Completions before → after (greedy, seed 0):", ""]
    for i in range(min(EXAMPLES_SHOWN, len(start["outputs"]))):
        lines.append(f"- **{heldout['source'][i]}** (reference: {heldout['reference'][i]})")
        lines.append(f"  - start: {start['outputs'][i]!r}")
        for run in runs:
            if run["seed"] == min(r["seed"] for r in runs) and i < len(run["outputs"]):
                lines.append(f"  - {run['method']}: {run['outputs'][i]!r}")
    return "\n".join(lines) + "\n"


def report(out: str, methods: list[str], seeds: list[int], size_name: str, meta: dict) -> dict:
    runs = []
    for m in methods:
        for s in seeds:
            if os.path.exists(learning.run_path(out, m, s)):
                with open(learning.run_path(out, m, s)) as f:
                    runs.append(json.load(f))
    rows = summarise(runs)
    start = start_record(size_name, out)
    _, heldout = load_task(SIZES[size_name])
    table = render_markdown(rows, runs, start, heldout, meta)
    with open(os.path.join(out, "real_translation.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "methods": rows}, f, indent=1)
    learning.plot(runs, os.path.join(out, "real_translation.png"))
    print(table)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized: 3 methods, 1 seed, 2 batches of 4")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="default: ppo grpo-g4 rloo-k4")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--budget", type=int, default=None, help="completions per run (default 256; quick 8)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--out", default="benchmarks/results/real_translation")
    parser.add_argument("--resume", action="store_true", help="skip runs whose results are already saved")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    budget = args.budget or size.budget
    if budget % size.batch:
        parser.error(f"--budget must be a multiple of {size.batch} (completions per batch)")
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.jobs} runs at a time",
        "command": "python benchmarks/real_translation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": seeds,
        "budget": budget,
    }
    if not args.report_only:
        todo = [
            (m, s)
            for s in seeds
            for m in methods
            if not (args.resume and os.path.exists(learning.run_path(args.out, m, s)))
        ]
        started = time.perf_counter()
        start_record(size_name, args.out)  # once, before parallel runs would each compute it
        job = (size_name, budget, args.out)
        if args.jobs == 1:
            for i, (m, s) in enumerate(todo):
                learning._progress(i + 1, len(todo), run_one(m, s, *job), started)
        else:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_one, m, s, *job) for m, s in todo]
                for i, future in enumerate(futures):
                    learning._progress(i + 1, len(todo), future.result(), started)
        meta["wall_seconds"] = time.perf_counter() - started
    return report(args.out, methods, seeds, size_name, meta)


if __name__ == "__main__":
    main()
