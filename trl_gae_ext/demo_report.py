"""What the built-in demo shows while it runs and leaves behind: progress bars (or, with `--no_progress`, one summary
line per held-out evaluation), the `metrics.jsonl` records, `reward_curve.png` and the held-out samples."""

from __future__ import annotations

import json
import math


def quiet(trainer) -> None:
    """No log dictionaries on stdout: with `disable_tqdm` the `Trainer` prints every log (200 dictionaries for the
    demo's 200 PPO iterations) through its `PrinterCallback`; the demo reports in its own lines instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def progress_callback(base, desc: str, postfix=None):
    """A progress bar callback (subclass of `base`, the `Trainer`'s or the PPO iteration bar) titled `desc`, counted
    in PPO iterations (or steps for SFT), showing `postfix(logs)` and never printing log dicts under the bar."""
    from tqdm.auto import tqdm

    class DemoProgress(base):
        def on_train_begin(self, args, state, control, **kwargs):
            per_unit = getattr(args, "steps_per_rollout", 1)
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=math.ceil(state.max_steps / per_unit), desc=desc, dynamic_ncols=True)
            self.current_step = 0

        def on_rollout_end(self, args, state, control, **kwargs):
            pass  # the postfix comes from the logs, with the held-out BLEU

        def on_log(self, args, state, control, logs=None, **kwargs):
            if postfix is not None and self.training_bar is not None and "objective/scores" in (logs or {}):
                self.training_bar.set_postfix(postfix(logs))

    return DemoProgress


def make_demo_callback(evaluator, every: int, iterations: int, records: list, metrics_file, report=None):
    """A `TrainerCallback` that writes one JSONL record per PPO iteration (from the trainer's logs, one per
    iteration) and, after it, evaluates held-out BLEU (`evaluator`, a `demo.HeldoutBleu`) every `every` iterations
    and after the last one. With `report` (the quiet mode's `print`), each evaluation also gives one summary line."""
    from transformers import TrainerCallback

    class HeldoutBleuCallback(TrainerCallback):
        latest: float | None = None

        def _write(self, record: dict) -> None:
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not logs or "objective/scores" not in logs:
                return
            iteration = math.ceil(state.global_step / args.steps_per_rollout)
            numbers = {k: v for k, v in logs.items() if isinstance(v, int | float)}
            self._write({"kind": "train", "iteration": iteration, "step": state.global_step, **numbers})
            if iteration % every == 0 or iteration == iterations:
                scores = evaluator.score(getattr(model, "policy", model))
                self.latest = scores["bleu"]
                self._write(evaluator.record(scores, iteration, state.global_step))
                if report is not None:
                    report(
                        f"iteration {iteration}/{iterations}: reward {logs['objective/scores']:.3f}, "
                        f"KL {logs.get('objective/kl', 0.0):.3f}, held-out BLEU {scores['bleu']:.1f}"
                    )

    return HeldoutBleuCallback()


def plot_curves(records: list[dict], path: str) -> None:
    """`reward_curve.png`: mean sampled reward, KL to the reference and held-out BLEU against the PPO iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        (axes[0], train, "objective/scores", "reward: sentence BLEU of samples (0-1)", "tab:blue"),
        (axes[1], train, "objective/kl", "KL to the warm start (nats / sequence)", "tab:red"),
        (axes[2], evals, "heldout/bleu", "held-out BLEU (greedy, corpus, 0-100)", "tab:green"),
    ]
    for ax, rows, key, title, color in panels:
        marker = "." if len(rows) <= 60 else None
        ax.plot([r["iteration"] for r in rows], [r.get(key, float("nan")) for r in rows], color=color, marker=marker)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.suptitle("trl-gae demo: PPO + GAE on 'spell the number'", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_samples(evaluator, before: list[str], after: list[str], n: int = 4) -> None:
    print("held-out samples (prompt: warm start | after PPO | reference):")
    for prompt, b, a, ref in list(zip(evaluator.prompts, before, after, evaluator.references))[:n]:
        mark = "ok" if a == ref else "--"
        print(f"  {prompt:>4}: {b or '(empty)'} | {a or '(empty)'} | {ref}  [{mark}]")
