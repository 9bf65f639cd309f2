"""Dataset loading shared by `trl-gae ppo` and the example scripts: a hub id, a data file (.json/.jsonl/.csv/
.parquet/.arrow), a directory of data files or a directory written by `save_to_disk`. Errors are one-line `CLIError`s.
"""

from __future__ import annotations

import os

from .errors import CLIError


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def load_any_dataset(name: str, config: str | None = None):
    """A `Dataset` or `DatasetDict` from a hub id, a data file, a directory of data files or a `save_to_disk` dir.

    A single file becomes the `train` split.
    """
    import datasets

    fix = (
        "pass a .json/.jsonl/.csv/.parquet file, a directory of such files, a directory written by "
        "`save_to_disk`, or a hub dataset id (needs network)"
    )
    path = os.path.expanduser(name)
    try:
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in DATA_FILE_BUILDERS:
                raise CLIError(f"cannot read dataset {name!r}: unsupported file type {ext or '(none)'}", fix)
            return datasets.load_dataset(DATA_FILE_BUILDERS[ext], data_files={"train": path})
        if os.path.isdir(path):
            if _is_saved_dataset(path):
                return datasets.load_from_disk(path)
            return datasets.load_dataset(path, name=config)
        if os.path.splitext(path)[1].lower() in DATA_FILE_BUILDERS or name.startswith((".", "/", "~")):
            raise CLIError(f"cannot read dataset {name!r}: no such file or directory", fix)
        return datasets.load_dataset(name, name=config)
    except CLIError:
        raise
    except Exception as err:  # datasets raises many types (DatasetNotFoundError, ArrowInvalid, ConnectionError...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"cannot read dataset {name!r}: {reason}", fix) from err


def pick_split(data, split: str, name: str, required: bool = True):
    import datasets

    if isinstance(data, datasets.Dataset):
        return data if split == "train" or required else None
    if split in data:
        return data[split]
    if not required:
        return None
    raise CLIError(
        f"dataset {name!r} has no split {split!r} (splits: {', '.join(data)})",
        "pass --dataset_train_split with one of those",
    )


def prepare_columns(dataset, script_args, needs_reference: bool, what: str):
    """Rename the prompt column to `prompt` and check the reference column; `CLIError` naming the fix."""
    columns = list(dataset.column_names)
    if script_args.prompt_column not in columns:
        raise CLIError(
            f"{what} has no prompt column {script_args.prompt_column!r} (columns: {', '.join(columns)})",
            "pass --prompt_column <name of the column holding the prompts>",
        )
    if script_args.prompt_column != "prompt":
        if "prompt" in columns:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(script_args.prompt_column, "prompt")
    if needs_reference and script_args.reference_column not in columns:
        raise CLIError(
            f"{what} has no reference column {script_args.reference_column!r} needed by the metric rewards "
            f"(columns: {', '.join(columns)})",
            "pass --reference_column <name of the column holding the reference text>",
        )
    return dataset


def load_split(name: str, config: str | None = None, split: str = "train"):
    """One split of `load_any_dataset(name, config)`: what the example scripts train on. A single data file is the
    `train` split; a missing split is a `CLIError` listing the splits there are."""
    return pick_split(load_any_dataset(name, config), split, name)


def require_columns(dataset, fixes: dict[str, str], what: str) -> None:
    """A `CLIError` naming the first column of `fixes` (column -> how to fix it) that `dataset` lacks."""
    columns = list(dataset.column_names)
    for column, fix in fixes.items():
        if column not in columns:
            raise CLIError(f"{what} has no column {column!r} (columns: {', '.join(columns)})", fix)
