"""TRL's reward-function protocol, implemented once for every reference-based reward.

A reward function is a callable `(prompts, completions, **columns) -> list[float | None]` with a `__name__`
(TRL logs `rewards/<__name__>/mean`). TRL passes every dataset column except `prompt` as a keyword argument
holding one value per completion, plus a few non-column keywords (`completion_ids`, `trainer_state`,
`log_extra`, `log_metric`, `environments`). `ReferenceReward` reads the reference column, turns conversational
completions into their assistant text, validates types and handles the edge cases the same way for every
metric; subclasses only score `(completion_text, [reference, ...])` pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


# Keywords TRL's GRPOTrainer/RLOOTrainer pass to reward functions that are not dataset columns.
NON_COLUMN_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


class MissingColumnError(KeyError, ValueError):
    """The reference column is absent from the reward function's keyword arguments.

    Subclasses both `KeyError` (a missing key) and `ValueError` (a wrong setting), so either `except` catches it.
    """

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


def dataset_columns(kwargs: Mapping[str, Any]) -> list[str]:
    """The keyword arguments of a reward call that are dataset columns."""
    return sorted(key for key in kwargs if key not in NON_COLUMN_KWARGS)


def message_text(content: Any) -> str:
    """Text of a chat message's `content`: a string, `None` (tool-call turns) or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") or "" for part in content if isinstance(part, Mapping))
    raise TypeError(f"message content has type {type(content).__name__}; expected a string or a list of parts")


def completion_text(completion: Any, index: int, owner: str) -> str:
    """The text to score: the completion itself, or the assistant turns of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):  # a single message
        completion = [completion]
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        texts = [message_text(m.get("content")) for m in completion if m.get("role", "assistant") == "assistant"]
        return "\n".join(text for text in texts if text)
    raise TypeError(
        f"{owner}: column 'completions' row {index} has type {type(completion).__name__}; "
        "expected a string or a list of chat messages (dicts with 'role' and 'content')."
    )


def reference_list(value: Any, index: int, column: str, owner: str) -> list[str] | None:
    """One row of the reference column as a list of strings; `None` when the row has no reference."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    is_array = getattr(value, "ndim", None) == 1  # numpy array of strings (pandas/numpy-formatted datasets)
    if is_array or (isinstance(value, Sequence) and not isinstance(value, bytes)):
        refs = value.tolist() if is_array else list(value)
        bad = [ref for ref in refs if ref is not None and not isinstance(ref, str)]
        if not bad:
            refs = [ref for ref in refs if ref is not None]
            return refs or None
        value = bad[0]
        raise TypeError(
            f"{owner}: column {column!r} row {index} holds a value of type {type(value).__name__}; "
            "expected a string, a list of strings or None."
        )
    raise TypeError(
        f"{owner}: column {column!r} row {index} has type {type(value).__name__}; "
        "expected a string, a list of strings or None."
    )


class ReferenceReward:
    """Base class of the reference-based rewards: the instance is the TRL reward function.

    Subclasses set `default_name` and implement `score(completion, references) -> float` (or `score_batch` for
    metrics that score many pairs at once). The base class guarantees, for every subclass:

    - one value per completion; conversational completions are scored on their assistant text;
    - a missing reference column raises `MissingColumnError` (a `KeyError` and a `ValueError`) naming the column
      and listing the columns present; values of the wrong type raise `TypeError` naming column, row and type;
    - a `None` reference (or an empty list of references) gives `None`, which TRL skips;
    - an empty (or whitespace-only) completion scores 0.0 without calling the metric.

    Attributes whose name starts with `_lazy_` hold caches (scorers, loaded modules); they are rebuilt on first use
    and left out when pickling, so instances pickle cheaply and work in other processes.
    """

    default_name = "reference_reward"

    def __init__(self, reference_column: str = "reference", name: str | None = None):
        if not isinstance(reference_column, str) or not reference_column:
            raise ValueError(f"reference_column must be a non-empty string, got {reference_column!r}.")
        self.reference_column = reference_column
        self.__name__ = name or self.default_name

    # -- the protocol ---------------------------------------------------------------------------------------------
    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        if completions is None:
            raise TypeError(f"{self.__name__}: missing required argument 'completions'.")
        texts = [completion_text(c, i, self.__name__) for i, c in enumerate(completions)]
        references = self._references(columns, len(texts))

        rewards: list[float | None] = [None] * len(texts)
        to_score = []
        for i, (text, refs) in enumerate(zip(texts, references)):
            if refs is None:
                continue
            if text.strip():
                to_score.append(i)
            else:
                rewards[i] = 0.0
        if to_score:
            scores = self.score_batch([texts[i] for i in to_score], [references[i] for i in to_score])
            for i, score in zip(to_score, scores):
                rewards[i] = None if score is None else float(score)
        return rewards

    def _references(self, columns: Mapping[str, Any], n: int) -> list[list[str] | None]:
        column = self.reference_column
        if column not in columns:
            raise MissingColumnError(
                f"{self.__name__}: reference column {column!r} not found. Columns present: "
                f"{dataset_columns(columns)}. Add a {column!r} column to the dataset or pass "
                f"reference_column=<name> to {type(self).__name__}."
            )
        values = columns[column]
        if isinstance(values, str) or not hasattr(values, "__len__"):
            raise TypeError(
                f"{self.__name__}: column {column!r} has type {type(values).__name__}; expected one value per "
                "completion (a list)."
            )
        if len(values) != n:
            raise ValueError(f"{self.__name__}: column {column!r} has {len(values)} values for {n} completions.")
        return [reference_list(value, i, column, self.__name__) for i, value in enumerate(values)]

    # -- what subclasses provide ----------------------------------------------------------------------------------
    def score(self, completion: str, references: list[str]) -> float:
        raise NotImplementedError

    def score_batch(self, completions: list[str], references: list[list[str]]) -> list[float | None]:
        return [self.score(c, refs) for c, refs in zip(completions, references)]

    # -- pickling and display -------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        return {key: (None if key.startswith("_lazy_") else value) for key, value in self.__dict__.items()}

    def _repr_args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = {**self._repr_args(), "reference_column": self.reference_column, "name": self.__name__}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
