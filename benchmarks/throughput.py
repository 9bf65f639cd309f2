"""Throughput: episodes/s of `trl_gae_ext.PPOTrainer` vs TRL 1.12's `trl.experimental.ppo.PPOTrainer`, one run.

    python benchmarks/throughput.py                                  # hidden 256, 4 layers: ~5 min on 2 CPU cores
    python benchmarks/throughput.py --hidden-size 128 --num-layers 2 # the smallest setting: ~2 min
    python benchmarks/throughput.py --baseline unchunked             # chunked log-probs (512) vs full logits
    python benchmarks/throughput.py --model smollm2 --batch-size 16 --num-ppo-epochs 1 --iterations 3 --rounds 2
                                                                     # SmolLM2-135M-Instruct: ~15 min on 2 CPU cores

TRL removed its `PPOTrainer` in 1.13, so the baseline runs in a throwaway virtualenv (`--venv`, cached between runs)
that sees the system packages (torch, transformers, accelerate, datasets) and has only `trl==1.12.0` installed on top,
with `--no-deps` and a `torch==<system version>` constraint so pip can never pull another torch.

Both trainers get the same setting, so the ratio measures the trainers and nothing else:
- the same tiny Llama-style policy, sequence-classification reward model and sequence-classification value model
  (built once from configs with `trl_gae_ext.tiny`, saved to `--workdir`, loaded by both from there), fp32, no
  gradient checkpointing, dropout disabled;
- the same prompts (fixed length, so no prompt padding), rollout batch, response length, temperature, PPO epochs,
  minibatches, learning rate, kl_coef 0.05 with k1 KL in the reward against a frozen reference copy of the policy,
  GAE gamma/lambda, advantage whitening, value clipping;
- no stop token on either side (every response has `--response-length` tokens), no saving, no reporting;
- each trainer runs in its own subprocess with the same seed, thread count and `OMP_WAIT_POLICY=PASSIVE` (spinning
  OpenMP threads collapse when other processes share the cores); `--rounds` runs per trainer, alternating the order.

`--model DIR` (a causal-LM checkpoint; `smollm2` = the offline SmolLM2-135M-Instruct of `trl_gae_ext.assets`) runs
the same comparison on a real model: the policy is that checkpoint, the reward and value models are
AutoModelForSequenceClassification(num_labels=1) on the same checkpoint with a fresh score head (the reward's x10,
as above), all fp32 and fully trained on both sides (no LoRA: TRL 1.12's PPOTrainer takes a PEFT policy only without a
separate reference, which ours does differently); its own BPE tokenizer, and prompts of `--prompt-length` words of
its vocabulary that encode to exactly one token each.

`--baseline unchunked` compares `trl_gae_ext.PPOTrainer` with itself instead: `logprob_chunk_size` from
`--logprob-chunk-size` (512) against `logprob_chunk_size=None` (full logits), rounds alternating the same way; no
virtualenv is needed.

Timing: wall clock from the end of the first PPO iteration (the warm-up: lazy inits, allocator growth) to the end of
the last one, measured by a `TrainerCallback` at the iteration boundaries; constructors are excluded.
episodes/s = all timed episodes of all rounds / their wall seconds. Process CPU seconds per episode are printed too:
on a machine with background load they move less than wall time. The first iteration's logged metrics of both
trainers are printed next to each other as a sanity check (KL to the reference ~0, ratio ~1, similar losses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


TRL_OLD_VERSION = "1.12.0"
METRICS = (
    "objective/kl",
    "objective/scores",
    "objective/entropy",
    "val/ratio",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/value_avg",
    "loss/policy_avg",
)
# syllables of the synthetic vocabulary (letters only: the tokenizer splits digits into single tokens)
ONSETS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()


# -- setup (system python) ---------------------------------------------------------------------------------------------
def ensure_venv(venv: str, torch_version: str) -> str:
    """Return the python of a virtualenv with `trl==1.12.0` over the system site-packages, creating it if needed."""
    python = os.path.join(venv, "bin", "python")
    probe = "import trl, transformers; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)"
    if os.path.exists(python):
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_worker_env())
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [TRL_OLD_VERSION]:
            return python
    print(f"Setting up {venv} with trl=={TRL_OLD_VERSION} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    constraints = os.path.join(venv, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(f"torch=={torch_version}\n")  # never let pip replace the CPU torch with a CUDA build
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "-c", constraints]
    subprocess.run(pip + [f"trl=={TRL_OLD_VERSION}"], check=True)
    subprocess.run([python, "-c", probe], check=True, capture_output=True, env=_worker_env())
    return python


def make_vocabulary(size: int) -> list[str]:
    words = [o1 + v1 + o2 + v2 for o1 in ONSETS for v1 in VOWELS for o2 in ONSETS for v2 in VOWELS]
    if size > len(words):
        raise ValueError(f"--vocab-size is at most {len(words)}.")
    return words[:size]


def make_prompts(words: list[str], n: int, length: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    # trailing space: text reward models score `prompt + completion`, and word-level decoding has no leading space
    return [" ".join(rng.choice(words) for _ in range(length)) + " " for _ in range(n)]


def build_models(spec: dict) -> None:
    """Tokenizer, policy, reward model and value model saved under `spec['model_dir']`, shared by both runs."""
    if spec.get("model"):
        return build_models_from(spec)
    import torch
    from transformers import AutoModelForSequenceClassification

    from trl_gae_ext.tiny import build_tiny_model, build_tokenizer

    words = make_vocabulary(spec["vocab_size"])
    tokenizer = build_tokenizer([" ".join(words)])
    shape = dict(
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        max_position_embeddings=spec["prompt_length"] + spec["response_length"] + 8,
    )
    models = {
        "policy": build_tiny_model(tokenizer, seed=spec["seed"], **shape),
        "reward": build_tiny_model(
            tokenizer, seed=spec["seed"] + 1, model_class=AutoModelForSequenceClassification, num_labels=1, **shape
        ),
        "value": build_tiny_model(
            tokenizer, seed=spec["seed"] + 2, model_class=AutoModelForSequenceClassification, num_labels=1, **shape
        ),
    }
    # a random reward head scores ~0 everywhere; a larger scale gives the critic and the advantages real signal
    with torch.no_grad():
        models["reward"].score.weight.mul_(10.0)
    for name, model in models.items():
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = None  # no stop token: fixed-length responses on both sides
        model.save_pretrained(os.path.join(spec["model_dir"], name))
        tokenizer.save_pretrained(os.path.join(spec["model_dir"], name))
    prompts = make_prompts(words, spec["num_prompts"], spec["prompt_length"], spec["seed"])
    lengths = {len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]}
    assert lengths == {spec["prompt_length"]}, f"prompts must all be {spec['prompt_length']} tokens, got {lengths}"
    with open(os.path.join(spec["model_dir"], "prompts.json"), "w") as f:
        json.dump(prompts, f)


def resolve_model(model: str) -> str:
    """`smollm2` -> the offline SmolLM2-135M-Instruct checkpoint (`trl_gae_ext.assets`); anything else is a path."""
    if model == "smollm2":
        from trl_gae_ext.assets import AssetMissing, smollm2_path

        try:
            return smollm2_path()
        except AssetMissing as err:
            raise SystemExit(f"--model smollm2: {err}") from None
    if not os.path.isdir(model):
        raise SystemExit(f"--model {model!r}: not a directory with a causal-LM checkpoint (or `smollm2`).")
    return model


def one_token_words(tokenizer, limit: int = 2000) -> list[str]:
    """Up to `limit` words (ASCII letters, 3+) that the tokenizer encodes, with their leading space, to one token."""
    words = []
    for token in sorted(tokenizer.get_vocab(), key=tokenizer.convert_tokens_to_ids):
        text = tokenizer.convert_tokens_to_string([token])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 3 and word.isascii() and word.isalpha():
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
                if len(words) == limit:
                    break
    return words


def build_models_from(spec: dict) -> None:
    """`build_models` for `--model DIR`: the checkpoint's policy with no stop token, fresh reward and value heads."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    src = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(spec["seed"])
    models = {"policy": AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)}
    for name in ("reward", "value"):
        models[name] = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32)
        models[name].config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        models["reward"].score.weight.mul_(10.0)
    models["policy"].generation_config.eos_token_id = None  # no stop token: fixed-length responses on both sides
    for name, model in models.items():
        model.save_pretrained(os.path.join(spec["model_dir"], name))
        tokenizer.save_pretrained(os.path.join(spec["model_dir"], name))
    words, rng = one_token_words(tokenizer), random.Random(spec["seed"])
    prompts = [
        " " + " ".join(rng.choice(words) for _ in range(spec["prompt_length"])) for _ in range(spec["num_prompts"])
    ]
    lengths = {len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]}
    assert lengths == {spec["prompt_length"]}, f"prompts must all be {spec['prompt_length']} tokens, got {lengths}"
    with open(os.path.join(spec["model_dir"], "prompts.json"), "w") as f:
        json.dump(prompts, f)


def _worker_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRL_EXPERIMENTAL_SILENCE="1",
        WANDB_DISABLED="true",
    )
    # OpenMP threads that spin while waiting collapse when other processes share the cores (measured here: 6x slower
    # matmuls with 2 spinning threads under background load); passive waiting keeps both runs comparable
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_worker(python: str, which: str, spec_path: str, workdir: str, round_index: int) -> dict:
    out = os.path.join(workdir, f"result-{which}-{round_index}.json")
    log = os.path.join(workdir, f"log-{which}-{round_index}.txt")
    if os.path.exists(out):
        os.remove(out)
    cmd = [python, os.path.abspath(__file__), "--worker", which, "--spec", spec_path, "--result", out]
    print(f"Round {round_index + 1}: {which} trainer ({python}) ...", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_worker_env())
    if done.returncode != 0 or not os.path.exists(out):
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"The {which} worker failed (exit {done.returncode}); end of {log}:\n{tail}")
    with open(out) as f:
        return json.load(f)


# -- workers (one trainer per process) -------------------------------------------------------------------------------
def _clock_callback(steps_per_iteration: int):
    from transformers import TrainerCallback

    class IterationClock(TrainerCallback):
        """Wall-clock time at the end of every PPO iteration (its last optimizer step)."""

        def __init__(self):
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []  # process CPU time (all threads): less sensitive to other load
            self.train_begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                self.marks.append(time.perf_counter())
                self.cpu_marks.append(time.process_time())

    return IterationClock()


def _load_models(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    d = spec["model_dir"]
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(d, "policy"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(d, "policy"))
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(d, "reward"), num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(d, "value"), num_labels=1)
    with open(os.path.join(d, "prompts.json")) as f:
        prompts = json.load(f)
    return tokenizer, policy, reward, value, prompts


def _common_args(spec: dict, output_dir: str) -> dict:
    """Training arguments both `PPOConfig`s take with the same meaning."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"] // spec["num_mini_batches"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["num_mini_batches"],
        num_ppo_epochs=spec["num_ppo_epochs"],
        response_length=spec["response_length"],
        temperature=spec["temperature"],
        learning_rate=spec["learning_rate"],
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        whiten_rewards=False,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        local_rollout_forward_batch_size=spec["batch_size"],
        total_episodes=spec["iterations"] * spec["batch_size"],
        seed=spec["seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def worker_unchunked(spec: dict) -> dict:
    """`trl_gae_ext.PPOTrainer` with full logits (`logprob_chunk_size=None`), the baseline of `--baseline unchunked`."""
    return worker_ours({**spec, "logprob_chunk_size": None})


def worker_ours(spec: dict, callbacks=()) -> dict:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    import trl_gae_ext
    from trl_gae_ext import PPOConfig, PPOTrainer

    set_seed(spec["seed"])
    tokenizer, policy, reward, value, prompts = _load_models(spec)
    args = PPOConfig(
        **_common_args(spec, os.path.join(spec["workdir"], "out-ours")),
        kl_in_reward=True,  # TRL 1.12: -kl_coef x KL is a per-token reward
        lam_critic=None,  # TRL 1.12: one lambda for actor and critic
        scale_scores="none",  # TRL 1.12: kl_coef in reward units
        whiten_advantages=True,
        logging_steps=spec["num_ppo_epochs"] * spec["num_mini_batches"],  # one log per iteration
        logprob_chunk_size=spec.get("logprob_chunk_size", 512),
    )
    clock = _clock_callback(args.steps_per_rollout)
    t0 = time.perf_counter()
    trainer = PPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        value_model=value,
        callbacks=[clock, *callbacks],
    )
    t1 = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    version = f"trl_gae_ext {trl_gae_ext.__version__}, logprob_chunk_size={args.logprob_chunk_size}"
    return _result(spec, clock, t1 - t0, logs, trainer_version=version, torch=torch)


def worker_old(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    set_seed(spec["seed"])
    tokenizer, policy, reward, value, prompts = _load_models(spec)
    ref_policy = type(policy).from_pretrained(os.path.join(spec["model_dir"], "policy"))
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    args = PPOConfig(
        **_common_args(spec, os.path.join(spec["workdir"], "out-old")),
        num_sample_generations=0,
        logging_steps=1,  # the old trainer logs every iteration regardless
    )
    clock = _clock_callback(1)  # one `global_step` per iteration
    t0 = time.perf_counter()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        value_model=value,
        callbacks=[clock],
    )
    t1 = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    return _result(spec, clock, t1 - t0, logs, trainer_version=f"trl {trl.__version__}", torch=torch)


def _result(spec, clock, init_s, logs, trainer_version, torch) -> dict:
    import transformers

    marks = clock.marks
    if len(marks) != spec["iterations"]:
        raise RuntimeError(f"Expected {spec['iterations']} iteration marks, got {len(marks)}.")
    timed_iterations = len(marks) - 1
    seconds = marks[-1] - marks[0]
    return {
        "trainer": trainer_version,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "init_s": init_s,
        "warmup_s": marks[0] - clock.train_begin,
        "timed_iterations": timed_iterations,
        "timed_episodes": timed_iterations * spec["batch_size"],
        "timed_s": seconds,
        "episodes_per_s": timed_iterations * spec["batch_size"] / seconds,
        "cpu_s": clock.cpu_marks[-1] - clock.cpu_marks[0],
        "iteration_s": [b - a for a, b in zip(marks, marks[1:])],
        "first_iteration": {k: logs[0].get(k) for k in METRICS} if logs else {},
        "last_iteration": {k: logs[-1].get(k) for k in METRICS} if logs else {},
        "response_length": logs[0].get("val/response_length") if logs else None,
        # ours only: where an iteration's time goes (generation; the rest of the rollout: scoring passes, rewards,
        # GAE), per timed iteration; the update is the iteration minus the rollout
        "phase_s": _phase_seconds(logs[1:], [b - a for a, b in zip(marks, marks[1:])]),
    }


def _phase_seconds(logs: list[dict], iteration_s: list[float]) -> dict | None:
    if not logs or any("time/rollout_s" not in h for h in logs):
        return None
    n = len(logs)
    generation = sum(h["time/generation_s"] for h in logs) / n
    rollout = sum(h["time/rollout_s"] for h in logs) / n
    iteration = sum(iteration_s) / len(iteration_s)
    return {"generation": generation, "scoring": rollout - generation, "update": iteration - rollout}


# -- report ------------------------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarize(runs: list[dict]) -> dict:
    """All rounds pooled: timed episodes / timed wall seconds (rounds alternate, so drifting background load hits both
    trainers alike), the per-round figures, and process CPU seconds per episode (the least load-sensitive figure)."""
    episodes = sum(r["timed_episodes"] for r in runs)
    return {
        "episodes_per_s": episodes / sum(r["timed_s"] for r in runs),
        "rounds": [r["episodes_per_s"] for r in runs],
        "median_iteration_s": _median([t for r in runs for t in r["iteration_s"]]),
        "cpu_s_per_episode": sum(r["cpu_s"] for r in runs) / episodes,
        "init_s": _median([r["init_s"] for r in runs]),
        "first": runs[0],
    }


def _repo_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"], capture_output=True
        )
    except OSError:
        return "unknown"
    return (
        rev.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    )


BASELINES = {"trl-1.12": ("old", "trl.experimental.ppo.PPOTrainer", "TRL 1.12"),
             "unchunked": ("unchunked", "trl_gae_ext.PPOTrainer", "unchunked")}  # fmt: skip


def _models_text(spec: dict) -> str:
    if spec.get("model"):
        return (
            f"policy = {spec['model']} ({spec['model_path']}), reward and value on the same checkpoint, fully trained"
        )
    return (
        f"policy, reward and value models Llama-style, hidden {spec['hidden_size']}, {spec['num_layers']} layers, "
        f"{spec['num_heads']} heads, vocab {spec['vocab_size'] + 7} (word-level)"
    )


def report(spec: dict, ours: list[dict], old: list[dict], wall_s: float) -> str:
    _, baseline_class, baseline = BASELINES[spec.get("baseline", "trl-1.12")]
    a, b = summarize(ours), summarize(old)
    ratio = a["episodes_per_s"] / b["episodes_per_s"]
    cpu_ratio = b["cpu_s_per_episode"] / a["cpu_s_per_episode"]
    timed = spec["iterations"] - 1
    lines = [
        "",
        f"PPO throughput: {spec['rounds']} round(s) per trainer, alternating; each round {timed} timed iterations x "
        f"{spec['batch_size']} episodes after 1 warm-up iteration; episodes/s = all timed episodes / their wall seconds",
        "",
        "| trainer | episodes/s | per round | s/iteration (median) | CPU s/episode | constructor s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = (f"trl_gae_ext.PPOTrainer ({a['first']['trainer']})", f"{baseline_class} ({b['first']['trainer']})")
    for name, r in zip(names, (a, b)):
        rounds = " / ".join(f"{x:.2f}" for x in r["rounds"])
        lines.append(
            f"| {name} | {r['episodes_per_s']:.2f} | {rounds} | {r['median_iteration_s']:.2f} | "
            f"{r['cpu_s_per_episode']:.3f} | {r['init_s']:.2f} |"
        )
    lines += [
        f"| **ratio ours / {baseline}** | **{ratio:.3f}x** | | | {cpu_ratio:.2f}x | |",
        "",
        f"Settings: {_models_text(spec)}; reward and value = AutoModelForSequenceClassification(num_labels=1); fp32; "
        f"rollout batch {spec['batch_size']}, num_mini_batches {spec['num_mini_batches']}, prompt "
        f"{spec['prompt_length']} tokens, response {spec['response_length']} tokens (no stop token), num_ppo_epochs "
        f"{spec['num_ppo_epochs']}, lr {spec['learning_rate']}, kl_coef {spec['kl_coef']} (k1, in the reward, frozen "
        f"reference copy), temperature {spec['temperature']}, seed {spec['seed']}; torch {a['first']['torch']}, "
        f"{a['first']['threads']} threads, transformers {a['first']['transformers']}, {os.cpu_count()} CPU cores, "
        f"{platform.machine()}; trl_gae_ext at {_repo_revision()}; load average (1 min) at the end "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "First-iteration metrics, first round (sanity check: KL to the reference ~0, ratio ~1 on both sides):",
        "",
        f"| metric | trl_gae_ext | {baseline} |",
        "|---|---:|---:|",
    ]
    for key in METRICS:
        lines.append(
            f"| {key} | {_fmt(ours[0]['first_iteration'].get(key))} | {_fmt(old[0]['first_iteration'].get(key))} |"
        )
    phases = [r["phase_s"] for r in ours if r.get("phase_s")]
    if phases:
        mean = {k: sum(p[k] for p in phases) / len(phases) for k in phases[0]}
        total = sum(mean.values())
        parts = ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in mean.items())
        lines += ["", f"Where trl_gae_ext's timed iterations go (mean per iteration): {parts}."]
    lines += ["", f"Total wall time of this script: {wall_s:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per trainer, alternating old/ours")
    parser.add_argument("--batch-size", type=int, default=32, help="episodes per rollout (per iteration)")
    parser.add_argument("--num-mini-batches", type=int, default=1)
    parser.add_argument("--num-ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1000, help="synthetic words (plus 7 special tokens)")
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--venv", default="/tmp/trl112-venv", help="cached virtualenv for trl==1.12.0")
    parser.add_argument("--workdir", default="/tmp/trl-gae-throughput", help="models, logs and results")
    parser.add_argument("--json", help="also write the settings and every run's result to this JSON file")
    parser.add_argument(
        "--baseline",
        choices=tuple(BASELINES),
        default="trl-1.12",
        help="trl-1.12: TRL 1.12's PPOTrainer; unchunked: ours with logprob_chunk_size=None",
    )
    parser.add_argument("--logprob-chunk-size", type=int, default=512, help="ours' logprob_chunk_size")
    parser.add_argument(
        "--model", help="a causal-LM checkpoint directory, or `smollm2` (offline), instead of the tiny models"
    )
    parser.add_argument("--worker", choices=("ours", "old", "unchunked"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        with open(args.spec) as f:
            spec = json.load(f)
        result = {"ours": worker_ours, "old": worker_old, "unchunked": worker_unchunked}[args.worker](spec)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1)
        return

    start = time.perf_counter()
    import torch

    if args.batch_size % args.num_mini_batches:
        parser.error("--batch-size must be a multiple of --num-mini-batches")
    if args.iterations < 2 or args.rounds < 1:
        parser.error("--iterations must be >= 2 (the first one is not timed) and --rounds >= 1")
    workdir = os.path.abspath(args.workdir)
    spec = {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "result", "venv", "json", "workdir")}
    spec.update(workdir=workdir, model_dir=os.path.join(workdir, "models"), num_prompts=4 * args.batch_size)
    if args.model:
        spec["model_path"] = resolve_model(args.model)
    os.makedirs(spec["model_dir"], exist_ok=True)
    baseline = BASELINES[args.baseline][0]
    old_python = ensure_venv(args.venv, torch.__version__.split("+")[0]) if baseline == "old" else sys.executable
    build_models(spec)
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)

    runs: dict[str, list[dict]] = {"ours": [], baseline: []}
    for r in range(args.rounds):
        # alternate the order so a slow drift in background load does not favour one side
        for which in (baseline, "ours") if r % 2 == 0 else ("ours", baseline):
            python = old_python if which == "old" else sys.executable
            runs[which].append(run_worker(python, which, spec_path, workdir, r))
    for name, results in runs.items():
        kl = results[0]["first_iteration"].get("objective/kl")
        if kl is None or abs(kl) > 1e-2:
            print(f"WARNING: {name} first-iteration KL to the reference is {kl}, expected ~0.", flush=True)
    text = report(spec, runs["ours"], runs[baseline], time.perf_counter() - start)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": spec, "ours": runs["ours"], args.baseline: runs[baseline]}, f, indent=1)


if __name__ == "__main__":
    main()
