"""The critic's value head: hidden states `[B, T, H]` -> values `[B, T]` in float32.

The head is a small `nn.Module` kept apart from the backbone so it can sit on a shared, adapter or separate critic
backbone alike, and be saved and reloaded on its own (`save_pretrained` / `from_pretrained`).
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn


VALUE_HEAD_TYPES = ("linear", "mlp")
VALUE_HEAD_WEIGHTS_NAME = "value_head.safetensors"
VALUE_HEAD_CONFIG_NAME = "value_head_config.json"


class ValueHead(nn.Module):
    """Scalar value per token from the backbone's last hidden states.

    - `head_type="linear"`: dropout -> `Linear(H, 1)`.
    - `head_type="mlp"`: dropout -> `Linear(H, M)` -> GELU (tanh approximation) -> `Linear(M, 1)`, with
      `M = mlp_hidden_size or H`.

    The output layer's weight is drawn from `N(0, init_std^2)` with `init_std` defaulting to `1 / sqrt(fan_in + 1)`
    (fan_in = H for the linear head), as OpenAI's lm-human-preferences and TRL's old PPO value head initialised it;
    `init_std=0` starts it at zero (`PPOConfig`'s default, see `PPOConfig.value_head_init_std`). Its bias is zero.
    The hidden MLP layer keeps PyTorch's default initialisation.

    The output is multiplied by `return_scale`, a buffer (saved with the weights) that `fit_return_scale` sets once
    to the spread of the first rollout's returns: Adam moves each weight by about the learning rate per step whatever
    the gradient's size, so without it the critic's step is fixed in reward units, however small the rewards are.

    Args:
        hidden_size: H, the backbone's hidden size.
        head_type: one of `VALUE_HEAD_TYPES`.
        mlp_hidden_size: M for the MLP head (default H); ignored by the linear head.
        dropout: dropout probability applied to the hidden states, in [0, 1).
        init_std: standard deviation of the output layer's initial weights (default `1 / sqrt(fan_in + 1)`); 0 gives
            zeros.
    """

    def __init__(
        self,
        hidden_size: int,
        head_type: str = "linear",
        mlp_hidden_size: int | None = None,
        dropout: float = 0.0,
        init_std: float | None = None,
    ):
        super().__init__()
        if head_type not in VALUE_HEAD_TYPES:
            raise ValueError(f"Unknown value head type {head_type!r}; valid types are {', '.join(VALUE_HEAD_TYPES)}.")
        if not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"`hidden_size` must be a positive integer, got {hidden_size!r}.")
        if mlp_hidden_size is not None and not (isinstance(mlp_hidden_size, int) and mlp_hidden_size > 0):
            raise ValueError(f"`mlp_hidden_size` must be None or a positive integer, got {mlp_hidden_size!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout}.")
        if init_std is not None and not init_std >= 0:
            raise ValueError(f"`init_std` must be None or >= 0, got {init_std}.")
        self.config = {
            "hidden_size": hidden_size,
            "head_type": head_type,
            "mlp_hidden_size": mlp_hidden_size,
            "dropout": dropout,
            "init_std": init_std,
        }
        self.hidden_size = hidden_size
        self.head_type = head_type

        self.dropout = nn.Dropout(dropout)
        if head_type == "linear":
            self.summary = nn.Identity()
            fan_in = hidden_size
        else:
            fan_in = mlp_hidden_size or hidden_size
            self.summary = nn.Sequential(nn.Linear(hidden_size, fan_in), nn.GELU(approximate="tanh"))
        self.out = nn.Linear(fan_in, 1)
        std = init_std if init_std is not None else 1.0 / math.sqrt(fan_in + 1)
        if std > 0:
            nn.init.normal_(self.out.weight, mean=0.0, std=std)
        else:
            nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("return_scale", torch.ones(()))
        self.register_buffer("return_scale_fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Values per position.

        Args:
            hidden_states: Shape: `[B, T, H]`, any floating dtype (e.g. bf16 from a 4-bit backbone).

        Returns:
            Shape: `[B, T]`, float32. The hidden states are cast to the head's parameter dtype (float32 unless
            someone cast the head) so a bf16 backbone does not force a bf16 value regression.
        """
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"ValueHead expects hidden states with last dimension {self.hidden_size}, got {tuple(hidden_states.shape)}."
            )
        x = hidden_states.to(self.out.weight.dtype)
        x = self.summary(self.dropout(x))
        return (self.out(x).squeeze(-1) * self.return_scale).float()

    @torch.no_grad()
    def set_return_scale(self, scale: float) -> None:
        """Multiply the output by `scale` from now on (values keep their units: reward units)."""
        self.return_scale.fill_(scale)
        self.return_scale_fitted.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *args):
        # a head saved before the return scale existed predicts in reward units as it is: scale 1, counted as fitted
        for name, default in (("return_scale", 1.0), ("return_scale_fitted", True)):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.tensor(default, dtype=getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *args)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `value_head.safetensors` (weights) and `value_head_config.json` (constructor args) to a folder."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, VALUE_HEAD_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, VALUE_HEAD_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike) -> ValueHead:
        """Rebuild a head saved with `save_pretrained` (weights keep their saved dtype, loaded on the CPU)."""
        from safetensors.torch import load_file

        with open(os.path.join(save_directory, VALUE_HEAD_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        head = cls(**config)
        state = load_file(os.path.join(save_directory, VALUE_HEAD_WEIGHTS_NAME))
        head.load_state_dict(state)
        # load_state_dict copies into the fp32 parameters; keep a saved non-fp32 dtype if the head was cast.
        dtype = next(iter(state.values())).dtype
        return head.to(dtype)

    def extra_repr(self) -> str:
        return f"head_type={self.head_type!r}, hidden_size={self.hidden_size}"


@torch.no_grad()
def fit_return_scale(head: nn.Module, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, moments) -> float:
    """Fit a `ValueHead`'s output scale to the standard deviation of the Monte Carlo returns of a rollout, once: at
    the first rollout whose returns vary. Returns the factor by which the head's outputs changed (1.0 when nothing
    changed), to rescale values already computed with the old scale.

    The critic then learns in units of the return's spread: a freshly initialised linear head moves its output by
    about `lr x sum_i |h_i|` per Adam step, ~0.1 at lr 2e-4 on SmolLM2-135M's final hidden states (norm ~45), against
    BLEU returns of 0.02 +- 0.03; measured in docs/learning.md. Heads of other types (`ScoreHead`) are left alone.

    Args:
        rewards, mask: Shape: `[B, T]`, per-token rewards and the response mask.
        moments: `(x, mask) -> {"mean", "var"}` over every process (the trainer's `_global_moments`).
    """
    from .gae import compute_gae

    if not isinstance(head, ValueHead) or bool(head.return_scale_fitted):
        return 1.0
    returns = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[1]
    std = float(moments(returns, mask)["var"].sqrt())
    if not std > 0:  # every return equal (e.g. all rewards 0): nothing to measure yet
        return 1.0
    old = float(head.return_scale)
    head.set_return_scale(std)
    return std / old


@torch.no_grad()
def scaled_scores(scores: torch.Tensor, mode: str, model, moments) -> torch.Tensor:
    """Sequence scores in the units PPO adds them to the rewards, as `PPOConfig.scale_scores` says.

    'none': as they are. 'batch': `scores / std(scores)` of this rollout. 'first': divided by the std of the first
    rollout whose scores vary, stored on `model` (a `PolicyValueModel`: `model.score_scale`, saved with the critic,
    whose values are in these units) and kept from then on. Scores that are all equal are returned as they are.

    Args:
        scores: Shape: `[B]`, one score per sequence on this process.
        moments: `(x, mask) -> {"mean", "var"}` over every process (the trainer's `_global_moments`).
    """
    scale = model.score_scale if mode == "first" else None
    if mode != "none" and scale is None:
        std = float(moments(scores, torch.ones_like(scores))["var"].sqrt())
        if not std > 1e-8:
            return scores
        scale = std
        if mode == "first":
            model.score_scale = std
    return scores if scale is None else scores / scale
