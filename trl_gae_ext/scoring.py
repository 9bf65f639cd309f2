"""Reward functions in, one weighted score per completion out.

Accepts what TRL's `GRPOTrainer` accepts as `reward_funcs`: callables `(prompts, completions, **columns)` (sync or
async), sequence-classification models, and model ids/paths (loaded with `num_labels=1`). Every dataset column except
`prompt` is passed to callables as a keyword list, plus TRL's extras (`completion_ids`, `trainer_state`,
`log_extra`, `log_metric`), so TRL reward functions run unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_callable_name, get_config_model_id, is_async_callable


logger = logging.getLogger(__name__)

# keywords the trainer itself supplies to reward callables: never dataset columns
TRAINER_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def load_reward_funcs(
    reward_funcs: Any,
    reward_processing_classes: Any,
    fallback_tokenizer,
    model_init_kwargs: dict | None = None,
) -> tuple[list, list, list[str]]:
    """Normalise `reward_funcs` to a list, load model ids, and pair every model with a tokenizer.

    Returns `(funcs, processing_classes, names)`; `processing_classes[i]` is None for callables. A reward model with
    no saved tokenizer falls back to the policy's tokenizer (`fallback_tokenizer`).
    """
    if reward_funcs is None or (isinstance(reward_funcs, list | tuple) and len(reward_funcs) == 0):
        raise ValueError("`reward_funcs` is empty: pass at least one reward function, reward model or model id.")
    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if reward_processing_classes is None:
        classes = [None] * len(funcs)
    elif isinstance(reward_processing_classes, list | tuple):
        classes = list(reward_processing_classes)
    else:
        classes = [reward_processing_classes]
    if len(classes) != len(funcs):
        raise ValueError(
            f"Got {len(classes)} reward processing classes for {len(funcs)} reward functions; pass one per reward "
            "function (None for callables)."
        )
    names = []
    for i, func in enumerate(funcs):
        if isinstance(func, str):
            funcs[i] = func = AutoModelForSequenceClassification.from_pretrained(
                func, num_labels=1, **(model_init_kwargs or {})
            )
        if isinstance(func, nn.Module):
            if not isinstance(func, PreTrainedModel):
                raise TypeError(f"Reward model #{i} must be a `PreTrainedModel` (sequence classification).")
            func.eval().requires_grad_(False)
            names.append(get_config_model_id(func.config).split("/")[-1] or f"reward_model_{i}")
            if classes[i] is None:
                classes[i] = _reward_tokenizer(func, fallback_tokenizer)
            if classes[i].pad_token_id is None:
                classes[i].pad_token = classes[i].eos_token
            # the model scores the last non-pad token, so its pad id must be its tokenizer's
            func.config.pad_token_id = classes[i].pad_token_id
        elif callable(func):
            names.append(get_callable_name(func))
        else:
            raise TypeError(
                f"Reward #{i} ({type(func).__name__}) is neither a callable, a sequence-classification model nor a "
                "model id."
            )
    return funcs, classes, names


def _reward_tokenizer(model: PreTrainedModel, fallback):
    name = get_config_model_id(model.config)
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            pass
    logger.warning("Reward model %r has no saved tokenizer; using the policy's tokenizer for it.", name or model)
    return fallback


def required_columns(func: Callable) -> set[str]:
    """Dataset columns a reward callable needs: its keyword parameters without defaults (other than the ones the
    trainer supplies), plus an optional `required_columns` attribute (e.g. a metric's reference column)."""
    needed = set(getattr(func, "required_columns", ()) or ())
    if isinstance(func, nn.Module):
        return needed
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return needed
    for name, p in params.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in TRAINER_KWARGS:
            continue
        if p.default is inspect.Parameter.empty:
            needed.add(name)
    return needed


def check_reward_columns(funcs: Sequence, names: Sequence[str], columns: Sequence[str]) -> None:
    """Fail before any compute when a reward function needs a column the dataset lacks."""
    for func, name in zip(funcs, names):
        missing = sorted(required_columns(func) - set(columns))
        if missing:
            raise ValueError(
                f"Reward function '{name}' needs the dataset column(s) {missing}, but the dataset has "
                f"{sorted(columns)}. Add the column or rename it (e.g. `dataset.rename_column`)."
            )


def _run_coroutines(coros: list):
    async def gather():
        return await asyncio.gather(*coros)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # already inside an event loop (a notebook): run ours in a helper thread
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = asyncio.run(gather())
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _check_output(name: str, output: Any, expected: int) -> list[float]:
    if output is None or isinstance(output, str | bytes) or not hasattr(output, "__len__"):
        raise TypeError(f"Reward function '{name}' must return a list of floats, got {type(output).__name__}.")
    if len(output) != expected:
        raise ValueError(
            f"Reward function '{name}' returned {len(output)} rewards for {expected} completions; it must return "
            "exactly one value (or None) per completion."
        )
    values = []
    for v in output:
        if v is None:
            values.append(math.nan)  # skipped, as in TRL
            continue
        v = float(v)
        if math.isinf(v):
            raise ValueError(f"Reward function '{name}' returned {v}; rewards must be finite (return None to skip).")
        values.append(v)
    return values


class RewardScorer:
    """Calls every reward function on a batch and returns a `[B, F]` float32 tensor (NaN where a function skipped)."""

    def __init__(self, funcs: list, processing_classes: list, names: list[str]):
        self.funcs, self.processing_classes, self.names = funcs, processing_classes, names

    def to(self, device) -> RewardScorer:
        for func in self.funcs:
            if isinstance(func, nn.Module):
                func.to(device)
        return self

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list[list[int]],
        columns: dict[str, list],
        extras: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        n = len(prompts)
        out = torch.full((n, len(self.funcs)), math.nan, dtype=torch.float32)
        kwargs = dict(columns)
        kwargs.update(extras or {})
        pending = []
        for i, (func, name) in enumerate(zip(self.funcs, self.names)):
            if isinstance(func, nn.Module):
                out[:, i] = self._score_with_model(func, self.processing_classes[i], prompts, completions)
                continue
            try:
                result = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            except Exception as err:
                raise RuntimeError(f"Reward function '{name}' raised {type(err).__name__}: {err}") from err
            if is_async_callable(func) or inspect.isawaitable(result):
                pending.append((i, name, result))
            else:
                out[:, i] = torch.tensor(_check_output(name, result, n))
        if pending:
            try:
                results = _run_coroutines([coro for _, _, coro in pending])
            except Exception as err:
                names = ", ".join(name for _, name, _ in pending)
                raise RuntimeError(f"Async reward function(s) {names} raised {type(err).__name__}: {err}") from err
            for (i, name, _), result in zip(pending, results):
                out[:, i] = torch.tensor(_check_output(name, result, n))
        return out

    @torch.no_grad()
    def _score_with_model(self, model, tokenizer, prompts, completions) -> torch.Tensor:
        if is_conversational({"prompt": prompts[0]}):
            texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        device = next(model.parameters()).device
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return model(**inputs).logits[:, 0].float().cpu()
