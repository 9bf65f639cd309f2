"""Completion samples of a rollout: printed as a rich table and logged as a table to the trackers that show tables
(wandb, trackio), as TRL's `GRPOTrainer` does with `log_completions=True`."""

from __future__ import annotations

from transformers.utils import is_rich_available


TABLE_TRACKERS = ("wandb", "trackio")


def completions_table(samples: dict, step: int) -> dict[str, list]:
    """One row per completion, in the columns of TRL's `GRPOTrainer` table: step, prompt, completion, score."""
    n = len(samples["prompt"])
    return {
        "step": [step] * n,
        "prompt": list(samples["prompt"]),
        "completion": list(samples["completion"]),
        "score": [float(s) for s in samples["scores"]],
    }


def table_trackers(report_to: list[str] | None) -> list:
    """The tracker modules among `report_to` that are installed, running and take tables: wandb (once its run is
    started, by the `Trainer`'s `WandbCallback`) and trackio."""
    from transformers.integrations import is_trackio_available, is_wandb_available

    trackers = []
    if report_to and "wandb" in report_to and is_wandb_available():
        import wandb

        if wandb.run is not None:
            trackers.append(wandb)
    if report_to and "trackio" in report_to and is_trackio_available():
        import trackio

        trackers.append(trackio)
    return trackers


def log_completions(args, step: int, samples: dict) -> dict[str, list]:
    """Print `args.num_completions_to_print` samples (needs `rich`) and log every sample as a `completions` table
    to wandb/trackio when `args.report_to` names them; returns the table's columns."""
    from trl.trainer.utils import print_prompt_completions_sample

    table = completions_table(samples, step)
    if is_rich_available():
        print_prompt_completions_sample(
            table["prompt"], table["completion"], {"score": table["score"]}, None, step, args.num_completions_to_print
        )
    trackers = table_trackers(args.report_to)
    if trackers:
        import pandas as pd

        frame = pd.DataFrame(table)
        for tracker in trackers:
            tracker.log({"completions": tracker.Table(dataframe=frame)})
    return table
