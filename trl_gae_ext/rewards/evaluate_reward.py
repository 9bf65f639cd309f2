"""Any Hugging Face `evaluate` module as a per-sample TRL reward, and offline loading of BLEU/ROUGE/chrF.

`evaluate.load("bleu")` downloads the module script from the Hub. Offline (and in this project's CI) it fails,
after retrying with sleeps, or after long timeouts where the network drops packets. This package ships
evaluate-loadable BLEU, ROUGE and chrF modules (built on sacrebleu / rouge_score, under `rewards/metrics/`);
`load_metric` uses them when the Hub cannot be reached:

1. a local path (file or directory) is loaded as is;
2. for `bleu`, `rouge`, `chrf`: if `HF_HUB_OFFLINE` or `HF_EVALUATE_OFFLINE` is set, or an earlier attempt in this
   process failed, or the Hub does not answer a 3-second probe, the packaged module is loaded (one log line);
   otherwise `evaluate.load(name)` is tried once and the packaged module is the fallback;
3. any other name goes to `evaluate.load`.

`evaluate` itself (which imports transformers and torch) is imported on first use only.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Sequence
from numbers import Number
from pathlib import Path
from typing import Any

from .base import ReferenceReward


logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
PACKAGED_METRICS = ("bleu", "chrf", "rouge")

# Which output key is "the score" of well-known modules whose result has several keys.
DEFAULT_SCORE_KEYS = {
    "rouge": "rougeL",
    "chrf": "score",
    "sacrebleu": "score",
    "ter": "score",
    "bertscore": "f1",
    "bleurt": "scores",
}

_ENV_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_PROBE_TIMEOUT_S = 3.0
_hub_state: dict[str, bool] = {}  # "unreachable" -> True once the Hub failed in this process


def packaged_metric_path(name: str) -> str:
    """Directory of a packaged evaluate module: `evaluate.load(packaged_metric_path("bleu"))` loads it."""
    if name not in PACKAGED_METRICS:
        raise ValueError(f"No packaged evaluate module named {name!r}; packaged: {list(PACKAGED_METRICS)}.")
    return str(METRICS_DIR / name)


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        if os.environ.get(var, "").upper() in _ENV_TRUE:
            return var
    return None


def _hub_answers(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub endpoint (honours HF_ENDPOINT and proxy variables), in a daemon thread so that
    a hanging DNS lookup, which `requests`' timeout does not cover, cannot hold the caller longer than `timeout`."""
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answered: list[bool] = []

    def probe():
        try:
            requests.head(endpoint, timeout=timeout, allow_redirects=False)
            answered.append(True)
        except requests.RequestException:
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def load_metric(name_or_path: str, **load_kwargs):
    """`evaluate.load` that falls back to the packaged BLEU/ROUGE/chrF modules when the Hub is unreachable."""
    import evaluate

    if os.path.exists(name_or_path):
        return evaluate.load(str(name_or_path), **load_kwargs)
    if name_or_path not in PACKAGED_METRICS:
        return evaluate.load(name_or_path, **load_kwargs)

    packaged = packaged_metric_path(name_or_path)
    offline_var = _offline_env()
    reason = f"{offline_var} is set" if offline_var else None
    if reason is None and _hub_state.get("unreachable"):
        reason = "the Hub was unreachable earlier in this process"
    if reason is None and not _hub_answers():
        reason = "the Hugging Face Hub does not answer"
    if reason is None:
        try:
            return evaluate.load(name_or_path, **load_kwargs)
        except Exception as err:  # evaluate raises FileNotFoundError, ConnectionError, HTTP errors...
            reason = f"evaluate.load({name_or_path!r}) failed ({type(err).__name__}: {str(err)[:200].rstrip('.')})"
    # One warning per process; later fallbacks (another metric, another reward) only log at INFO level.
    log = logger.info if _hub_state.get("warned") else logger.warning
    _hub_state.update(unreachable=True, warned=True)
    log(
        "%s; loading the packaged offline %r module from %s (%s fall back to packaged modules from now on).",
        reason,
        name_or_path,
        packaged,
        "/".join(PACKAGED_METRICS),
    )
    return evaluate.load(packaged, **load_kwargs)


def _metric_label(metric: Any) -> str:
    if isinstance(metric, (str, os.PathLike)):
        path = Path(metric)
        return path.stem if path.suffix == ".py" else (path.name or metric)
    return getattr(metric, "name", None) or type(metric).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0)


class EvaluateReward(ReferenceReward):
    """Wrap any `evaluate` module as a per-sample reward.

    Args:
        metric: a module name (`"rouge"`, `"bleu"`, `"chrf"` fall back to the packaged modules offline; any other
            name needs the Hub or evaluate's cache), a local path to a module script or its directory, or a loaded
            `evaluate.EvaluationModule`. Names and paths are loaded on the first call.
        score_key: the key of `compute()`'s result to use as the reward. Default: a known key for well-known modules
            (`rouge` -> `rougeL`, `chrf`/`sacrebleu` -> `score`, `bertscore` -> `f1`), else the key named like the
            module, else the only numeric key.
        reference_column: dataset column with the reference (a string or a list of strings).
        name: the reward's `__name__` (default `evaluate_<metric>` or `evaluate_<metric>_<score_key>`).
        load_kwargs: extra arguments for `evaluate.load` (default `{"keep_in_memory": True}`: no cache files, which
            also keeps several training processes from sharing one).
        **compute_kwargs: passed to every `compute()` call (e.g. `rouge_types=["rouge2"]`, `use_stemmer=True`).

    Values are returned as the module computes them (chrF/sacrebleu are on a 0-100 scale; see `scale_reward`).
    If the module's `compute` takes `use_aggregator` and you did not set it, `use_aggregator=False` is passed so
    that modules like `rouge` return per-sample lists. When the result for a batch is a list with one value per
    sample, one batched call scores the whole batch; when it is a single number, the reward calls `compute` once
    per sample from then on.
    """

    def __init__(
        self,
        metric,
        score_key: str | None = None,
        reference_column: str = "reference",
        name: str | None = None,
        load_kwargs: dict | None = None,
        **compute_kwargs,
    ):
        label = _metric_label(metric)
        default_name = f"evaluate_{label}" + (f"_{score_key}" if score_key and score_key != label else "")
        super().__init__(reference_column, name or default_name)
        self.metric = metric
        self.score_key = score_key
        self.load_kwargs = {"keep_in_memory": True} if load_kwargs is None else dict(load_kwargs)
        self.compute_kwargs = compute_kwargs
        self._batched: bool | None = None  # learnt on the first batch of more than one sample
        self._lazy_module = None if isinstance(metric, str) else metric

    @property
    def module(self):
        """The loaded `evaluate` module (loaded on first access)."""
        if self._lazy_module is None:
            by_name = isinstance(self.metric, (str, os.PathLike))
            self._lazy_module = load_metric(str(self.metric), **self.load_kwargs) if by_name else self.metric
        return self._lazy_module

    def _compute_kwargs(self) -> dict:
        kwargs = dict(self.compute_kwargs)
        compute = getattr(self.module, "_compute", None)
        if "use_aggregator" not in kwargs and compute is not None:
            if "use_aggregator" in inspect.signature(compute).parameters:
                kwargs["use_aggregator"] = False
        return kwargs

    def _resolve_key(self, result: dict) -> str:
        if not isinstance(result, dict):
            raise TypeError(f"{self.__name__}: compute() returned {type(result).__name__}; expected a dict.")
        if self.score_key is not None:
            if self.score_key not in result:
                raise KeyError(
                    f"{self.__name__}: score_key {self.score_key!r} not in the result keys {sorted(result)}."
                )
            return self.score_key
        module_name = getattr(self.module, "name", None)
        for key in (DEFAULT_SCORE_KEYS.get(module_name), module_name, _metric_label(self.metric)):
            if key in result:
                return key
        numeric = [k for k, v in result.items() if _is_number(v) or _is_number_list(v)]
        if len(numeric) == 1:
            return numeric[0]
        raise ValueError(
            f"{self.__name__}: cannot tell which of the result keys {sorted(result)} is the score; "
            "pass score_key=<key> to EvaluateReward."
        )

    def _compute(self, predictions: list[str], references: list) -> tuple[Any, int]:
        result = self.module.compute(predictions=predictions, references=references, **self._compute_kwargs())
        key = self._resolve_key(result)
        return result[key], key

    def score_batch(self, completions: list[str], references: list[list[str]]) -> list[float | None]:
        # Single-reference rows go in as strings (what most modules expect); if any row has several references,
        # every row goes in as a list, since evaluate infers one input format per call.
        if all(len(refs) == 1 for refs in references):
            refs_in: list = [refs[0] for refs in references]
        else:
            refs_in = references
        n = len(completions)
        if self._batched is not False:
            value, key = self._compute(completions, refs_in)
            if _is_number_list(value) and len(value) == n:
                if n > 1:
                    self._batched = True
                return [float(v) for v in value]
            if not _is_number(value):
                raise TypeError(
                    f"{self.__name__}: result[{key!r}] is a {type(value).__name__}; expected a number or a list "
                    "with one number per sample."
                )
            if n == 1:
                return [float(value)]
            self._batched = False  # an aggregate over the batch: score each sample on its own from now on
        return [float(self._compute([c], [r])[0]) for c, r in zip(completions, refs_in)]

    def _repr_args(self) -> dict:
        return {"metric": self.metric, "score_key": self.score_key, **self.compute_kwargs}


def _is_number_list(value: Any) -> bool:
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
        value = value.tolist()
    return isinstance(value, Sequence) and not isinstance(value, str) and all(_is_number(v) for v in value)
