"""Reward shaping wrappers: scale/shift, clip, length penalty.

Each wrapper is itself a TRL reward function around another one (any callable of `prompts, completions,
**columns`), keeps a readable `__name__` (`<inner>_scaled`, `<inner>_clipped`, `<inner>_length_penalized` unless
`name=` is given) and pickles when the inner function does (module-level functions and the reward classes of this
package do; lambdas do not). `None` rewards pass through unchanged. Combining several rewards is not done here:
pass them as a list to the trainer and weigh them with TRL's `reward_weights`.
"""

from __future__ import annotations

from collections.abc import Callable


def reward_name(func: Callable) -> str:
    """The name TRL logs for a reward function (`trl.trainer.utils.get_callable_name`, without importing TRL)."""
    while hasattr(func, "func") and hasattr(func, "keywords"):  # functools.partial
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


class _Wrapper:
    suffix = "wrapped"

    def __init__(self, reward: Callable, name: str | None):
        if not callable(reward):
            raise TypeError(f"reward must be a callable reward function, got {type(reward).__name__}.")
        self.reward = reward
        self.__name__ = name or f"{reward_name(reward)}_{self.suffix}"

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float | None]:
        rewards = self.reward(prompts=prompts, completions=completions, **kwargs)
        return [None if r is None else self.transform(float(r), i, completions, kwargs) for i, r in enumerate(rewards)]

    def transform(self, reward: float, index: int, completions, kwargs) -> float:
        raise NotImplementedError


class ScaledReward(_Wrapper):
    """`scale * reward + shift`."""

    suffix = "scaled"

    def __init__(self, reward: Callable, scale: float = 1.0, shift: float = 0.0, name: str | None = None):
        super().__init__(reward, name)
        self.scale = float(scale)
        self.shift = float(shift)

    def transform(self, reward, index, completions, kwargs):
        return self.scale * reward + self.shift

    def __repr__(self) -> str:
        return f"ScaledReward({self.reward!r}, scale={self.scale}, shift={self.shift}, name={self.__name__!r})"


class ClippedReward(_Wrapper):
    """`reward` clipped to `[low, high]` (either bound may be `None`)."""

    suffix = "clipped"

    def __init__(self, reward: Callable, low: float | None = None, high: float | None = None, name: str | None = None):
        if low is not None and high is not None and low > high:
            raise ValueError(f"clip bounds are reversed: low={low} > high={high}.")
        super().__init__(reward, name)
        self.low = low
        self.high = high

    def transform(self, reward, index, completions, kwargs):
        if self.low is not None:
            reward = max(reward, self.low)
        if self.high is not None:
            reward = min(reward, self.high)
        return reward

    def __repr__(self) -> str:
        return f"ClippedReward({self.reward!r}, low={self.low}, high={self.high}, name={self.__name__!r})"


LENGTH_UNITS = ("words", "chars", "tokens")


def _completion_length(completion, index: int, unit: str, kwargs: dict) -> int:
    if unit == "tokens":
        ids = kwargs.get("completion_ids")
        if ids is None:
            raise ValueError("unit='tokens' needs the completion_ids keyword, which TRL's trainers pass.")
        return len(ids[index])
    from .base import completion_text

    text = completion_text(completion, index, "length_penalty")
    return len(text.split()) if unit == "words" else len(text)


class LengthPenalizedReward(_Wrapper):
    """`reward - penalty * excess`, where `excess` is the relative distance outside `[min_length, max_length]`:
    `(length - max_length) / max_length` above the range, `(min_length - length) / min_length` below it.

    With `penalty=1` a completion twice `max_length` long loses 1.0, the whole range of a [0, 1] metric.
    `unit` is `"words"` (whitespace-separated), `"chars"` or `"tokens"` (from TRL's `completion_ids`).
    """

    suffix = "length_penalized"

    def __init__(
        self,
        reward: Callable,
        max_length: int | None = None,
        min_length: int | None = None,
        penalty: float = 1.0,
        unit: str = "words",
        name: str | None = None,
    ):
        if max_length is None and min_length is None:
            raise ValueError("Give max_length, min_length or both.")
        if (max_length is not None and max_length <= 0) or (min_length is not None and min_length <= 0):
            raise ValueError(f"Lengths must be positive: min_length={min_length}, max_length={max_length}.")
        if max_length is not None and min_length is not None and min_length > max_length:
            raise ValueError(f"min_length={min_length} is larger than max_length={max_length}.")
        if unit not in LENGTH_UNITS:
            raise ValueError(f"Invalid unit {unit!r}; valid: {list(LENGTH_UNITS)}.")
        super().__init__(reward, name)
        self.max_length = max_length
        self.min_length = min_length
        self.penalty = float(penalty)
        self.unit = unit

    def excess(self, length: int) -> float:
        if self.max_length is not None and length > self.max_length:
            return (length - self.max_length) / self.max_length
        if self.min_length is not None and length < self.min_length:
            return (self.min_length - length) / self.min_length
        return 0.0

    def transform(self, reward, index, completions, kwargs):
        length = _completion_length(completions[index], index, self.unit, kwargs)
        return reward - self.penalty * self.excess(length)

    def __repr__(self) -> str:
        return (
            f"LengthPenalizedReward({self.reward!r}, max_length={self.max_length}, min_length={self.min_length}, "
            f"penalty={self.penalty}, unit={self.unit!r}, name={self.__name__!r})"
        )


def scale_reward(reward: Callable, scale: float = 1.0, shift: float = 0.0, name: str | None = None) -> ScaledReward:
    """`scale * reward + shift`, e.g. `scale_reward(EvaluateReward("chrf"), 0.01)` for chrF on [0, 1]."""
    return ScaledReward(reward, scale, shift, name)


def clip_reward(reward: Callable, low: float | None = None, high: float | None = None, name=None) -> ClippedReward:
    """`reward` clipped to `[low, high]`."""
    return ClippedReward(reward, low, high, name)


def length_penalty(
    reward: Callable,
    max_length: int | None = None,
    min_length: int | None = None,
    penalty: float = 1.0,
    unit: str = "words",
    name: str | None = None,
) -> LengthPenalizedReward:
    """`reward` minus `penalty` times the relative length outside `[min_length, max_length]`."""
    return LengthPenalizedReward(reward, max_length, min_length, penalty, unit, name)
