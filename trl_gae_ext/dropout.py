"""Switch off every training-mode source of randomness in a model, so PPO's first ratio is exactly 1.

`trl.trainer.utils.disable_dropout_in_model` zeroes `nn.Dropout` modules only. Many `transformers` models also apply
dropout functionally, with a probability copied from their config onto the module at init: Llama/Qwen attention
(`self.attention_dropout`, used as `dropout=0.0 if not self.training else self.attention_dropout`), OPT's
`self.dropout` and `self.activation_dropout` (`nn.functional.dropout`), `layerdrop` (skips whole layers in training),
MoE routers' `jitter_noise`. The rollout scores tokens in eval mode and PPO trains in train mode, so any of these
makes the ratio differ from 1 before the first update (4e-2 to 7e-2 with `attention_dropout=0.2` or OPT's 0.1).
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PretrainedConfig
from trl.trainer.utils import disable_dropout_in_model


# probabilities of a training-mode perturbation, by the names transformers gives them: `dropout`,
# `attention_dropout`, `resid_pdrop`, `layerdrop`, `drop_path_rate`, `hidden_dropout_prob`, `router_jitter_noise`...
_RANDOM_IN_TRAINING = re.compile(r"drop|jitter")


def _zero_float_attributes(obj) -> None:
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and value != 0.0 and _RANDOM_IN_TRAINING.search(name):
            setattr(obj, name, 0.0)


def _disable_in_config(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    _zero_float_attributes(config)
    for value in vars(config).values():  # sub-configs (`text_config`, `vision_config`, ...)
        if isinstance(value, PretrainedConfig):
            _disable_in_config(value, seen)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout-like probability of `model` to 0, in its modules and in its config(s).

    Zeroes `nn.Dropout` modules (trl's `disable_dropout_in_model`, LoRA dropout included), then the float
    attributes named like a drop probability or a jitter (see `_RANDOM_IN_TRAINING`) on every submodule, where
    models keep the values copied from their config, and the same fields of every config reachable from the
    modules (sub-configs included), so the config says what the model does and saves it that way.
    """
    disable_dropout_in_model(model)
    seen: set[int] = set()
    for module in model.modules():
        _zero_float_attributes(module)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            _disable_in_config(config, seen)
