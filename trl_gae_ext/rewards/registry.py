"""Rewards by name, for YAML configs and the command line.

`REWARD_REGISTRY` maps each name to a factory taking keyword arguments; `get_reward(name, **kwargs)` builds one.
`"evaluate:<metric>"` wraps any `evaluate` module (a name or a local path) with `EvaluateReward`.
"""

from __future__ import annotations

from collections.abc import Callable

from .evaluate_reward import EvaluateReward
from .text_metrics import BleuReward, ChrFReward, ExactMatchReward, RougeReward, TokenF1Reward


def rouge1(**kwargs) -> RougeReward:
    return RougeReward(rouge_type="rouge1", **kwargs)


def rouge2(**kwargs) -> RougeReward:
    return RougeReward(rouge_type="rouge2", **kwargs)


def rougeL(**kwargs) -> RougeReward:
    return RougeReward(rouge_type="rougeL", **kwargs)


def rougeLsum(**kwargs) -> RougeReward:
    return RougeReward(rouge_type="rougeLsum", **kwargs)


def chrf_plus_plus(**kwargs) -> ChrFReward:
    return ChrFReward(**{"word_order": 2, **kwargs})


EVALUATE_PREFIX = "evaluate:"

REWARD_REGISTRY: dict[str, Callable] = {
    "bleu": BleuReward,
    "rouge1": rouge1,
    "rouge2": rouge2,
    "rougeL": rougeL,
    "rougeLsum": rougeLsum,
    "chrf": ChrFReward,
    "chrf++": chrf_plus_plus,
    "exact_match": ExactMatchReward,
    "token_f1": TokenF1Reward,
    "evaluate": EvaluateReward,  # get_reward("evaluate:<metric>") or get_reward("evaluate", metric=...)
}


def get_reward(name: str, **kwargs):
    """Build the reward registered as `name` (see `REWARD_REGISTRY`), or `EvaluateReward(<metric>, **kwargs)` for
    `"evaluate:<metric>"`. Raises `ValueError` listing the valid names for an unknown one."""
    if not isinstance(name, str):
        raise TypeError(f"reward name must be a string, got {type(name).__name__}.")
    if name.startswith(EVALUATE_PREFIX) and len(name) > len(EVALUATE_PREFIX):
        return EvaluateReward(name[len(EVALUATE_PREFIX) :], **kwargs)
    if name not in REWARD_REGISTRY:
        valid = [key for key in REWARD_REGISTRY if key != "evaluate"] + [f"{EVALUATE_PREFIX}<metric>"]
        raise ValueError(f"Unknown reward {name!r}. Valid names: {', '.join(valid)}.")
    return REWARD_REGISTRY[name](**kwargs)
