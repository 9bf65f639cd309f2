"""PPO with generalized advantage estimation and a configurable value head for current Hugging Face TRL.

Names are resolved lazily (PEP 562) so that `import trl_gae_ext` stays light: torch, transformers and TRL are
imported on first use of a name that needs them, and bitsandbytes only where 4-bit is asked for.
"""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "compute_gae": "gae",
    "compute_decoupled_gae": "gae",
    "adaptive_lambda": "gae",
    "masked_mean": "gae",
    "masked_var": "gae",
    "masked_whiten": "gae",
    "kl_penalty": "gae",
    "policy_loss": "gae",
    "value_loss": "gae",
    "explained_variance": "gae",
    "ValueHead": "value_head",
    "PPOConfig": "config",
    "PPOTrainer": "trainer",
    "AdaptiveKLCallback": "callbacks",
    "LambdaScheduleCallback": "callbacks",
}
_SUBMODULES = {"rewards", "gae", "value_head", "config", "trainer", "callbacks", "qlora", "planner", "cli", "demo"}

__all__ = [
    "AdaptiveKLCallback",
    "LambdaScheduleCallback",
    "PPOConfig",
    "PPOTrainer",
    "ValueHead",
    "__version__",
    "adaptive_lambda",
    "compute_decoupled_gae",
    "compute_gae",
    "explained_variance",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "rewards",
    "value_loss",
]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from . import rewards
    from .callbacks import AdaptiveKLCallback, LambdaScheduleCallback
    from .config import PPOConfig
    from .gae import (
        adaptive_lambda,
        compute_decoupled_gae,
        compute_gae,
        explained_variance,
        kl_penalty,
        masked_mean,
        masked_var,
        masked_whiten,
        policy_loss,
        value_loss,
    )
    from .trainer import PPOTrainer
    from .value_head import ValueHead
