"""Model layout: the policy, the critic (value head on one of three backbones) and the reference policy.

Critic layouts (`PPOConfig.value_head`):
- `shared`: the value head reads the policy's last hidden state; one forward gives logits and values.
- `adapter`: the policy is a `PeftModel`; a second LoRA adapter named `critic` on the same base gives the critic's
  hidden states. The reference policy is the same base with adapters disabled, so one copy of the base weights
  serves all three roles (the point of the 4-bit QLoRA setup).
- `separate`: the critic is its own backbone (a `value_model`, or a copy of the policy's initial weights).

`PolicyValueModel.forward` computes whatever the PPO step needs in one call, so DDP sees a single forward.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from trl.trainer.utils import entropy_from_logits, selective_log_softmax, use_adapter

from .value_head import ValueHead


CRITIC_ADAPTER = "critic"
CRITIC_DIR = "critic"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM/classification head) of a causal LM, sequence classifier or PeftModel."""
    if is_peft_model(model):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix, model) if isinstance(model, PreTrainedModel) else model


def hidden_size_of(model: nn.Module) -> int:
    config = (model.get_base_model() if is_peft_model(model) else model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.hidden_size


class ScoreHead(nn.Module):
    """Adapts a sequence-classification model's `score` layer to the value-head interface: `[B, T, H] -> [B, T]`."""

    def __init__(self, score: nn.Module):
        super().__init__()
        self.score = score

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = next(self.score.parameters())
        return self.score(hidden_states.to(weight.dtype))[..., 0].float()


@contextlib.contextmanager
def adapter_active(model, name: str | None):
    """Switch the active PEFT adapter (None disables all) without changing which parameters train: PEFT's
    `set_adapter` marks only the active adapter trainable, but both adapters learn in the same optimizer step."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with use_adapter(model, name):
        for p, flag in flags:
            p.requires_grad_(flag)
        yield
    for p, flag in flags:
        p.requires_grad_(flag)


def freeze_all_but_last_layers(model: PreTrainedModel, num_layers: int) -> None:
    """Train only the last `num_layers` transformer blocks plus everything after them (final norm, LM head)."""
    body = backbone_of(model)
    blocks = next((m for m in body.children() if isinstance(m, nn.ModuleList)), None)
    if blocks is None:
        raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__} for `trainable_layers`.")
    if num_layers > len(blocks):
        raise ValueError(f"`trainable_layers={num_layers}` but the model has only {len(blocks)} blocks.")
    model.requires_grad_(False)
    for block in list(blocks)[len(blocks) - num_layers :]:
        block.requires_grad_(True)
    for name, module in body.named_children():
        if module is not blocks and "norm" in name:  # final norm sits after the blocks
            module.requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None:
        head.requires_grad_(True)


class PolicyValueModel(nn.Module):
    """Policy + critic as one module, the `model` a `transformers.Trainer` optimizes and checkpoints."""

    def __init__(self, policy: nn.Module, value_head: nn.Module, layout: str, critic: nn.Module | None = None):
        super().__init__()
        if layout == "separate" and critic is None:
            raise ValueError("The 'separate' critic layout needs a critic backbone.")
        if layout == "adapter" and not is_peft_model(policy):
            raise ValueError("The 'adapter' critic layout needs a PEFT policy: pass a `peft_config`.")
        self.policy = policy
        self.value_head = value_head
        self.critic = critic
        self.layout = layout

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_response_tokens: int,
        temperature: float = 1.0,
        compute_policy: bool = True,
        compute_values: bool = True,
        compute_entropy: bool = False,
        entropy_grad: bool = False,
        values_past_end: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Log-probs, entropies and values of the last `num_response_tokens` tokens.

        Shape:
            input_ids, attention_mask: `[B, P + R]`, prompt left-padded, response right-padded.
            returns `logprobs`/`entropy`: `[B, R]`; `values`: `[B, R]` = V(s_t) for s_t = prompt + t response tokens,
            or `[B, R + 1]` with `values_past_end` (the last one is V(s_R), the bootstrap of a truncated response).
        """
        r = num_response_tokens
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded prompts
        out: dict[str, torch.Tensor] = {}
        hidden = None
        if compute_policy:
            need_hidden = compute_values and self.layout == "shared"
            result = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=r + 1,
                output_hidden_states=need_hidden,
                use_cache=False,
            )
            logits = result.logits[:, :-1].float() / temperature
            out["logprobs"] = selective_log_softmax(logits, input_ids[:, -r:])
            if compute_entropy:  # a logged statistic unless the loss has an entropy bonus
                with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                    out["entropy"] = entropy_from_logits(logits)
            if need_hidden:
                hidden = result.hidden_states[-1]
        if compute_values:
            if hidden is None:
                hidden = self._critic_hidden(input_ids, attention_mask, position_ids)
            keep = r + 1 if values_past_end else r
            start = hidden.shape[1] - r - 1
            out["values"] = self.value_head(hidden[:, start : start + keep])
        return out

    def _critic_hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.layout == "separate":
            return self.critic(**kwargs).last_hidden_state
        if self.layout == "adapter":
            with adapter_active(self.policy, CRITIC_ADAPTER):
                return backbone_of(self.policy)(**kwargs).last_hidden_state
        return backbone_of(self.policy)(**kwargs).last_hidden_state  # shared, values only

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, num_response_tokens, temperature=1.0, ref_model=None):
        """Log-probs under the reference policy: `ref_model` if given, else the PEFT base with adapters disabled."""
        if ref_model is None:
            if not is_peft_model(self.policy):
                raise ValueError("A reference model is needed when the policy is not a PEFT model.")
            with adapter_active(self.policy, None):
                return self.forward(input_ids, attention_mask, num_response_tokens, temperature, compute_values=False)[
                    "logprobs"
                ]
        r = num_response_tokens
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = ref_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=r + 1,
            use_cache=False,
        ).logits
        return selective_log_softmax(logits[:, :-1].float() / temperature, input_ids[:, -r:])

    # -- Trainer integration -----------------------------------------------------------------------------------
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        for model in (self.policy, self.critic):
            if model is None:
                continue
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
            else:  # transformers < 5.x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(model, "enable_input_require_grads"):  # frozen embeddings (LoRA) still need input grads
                model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def save_pretrained(self, output_dir: str) -> None:
        """Write the policy at `output_dir` (its PEFT adapter or the full model, loadable with `from_pretrained`) and
        the critic under `output_dir/critic/`; see `saving` for the layout."""
        from .saving import save_pretrained

        save_pretrained(self, output_dir)

    def load_critic(self, input_dir: str) -> None:
        """Reload the critic written by `save_pretrained` (to continue training from a saved model)."""
        from .saving import load_critic

        load_critic(self, input_dir)


def build_value_head(args, hidden_size: int) -> ValueHead:
    return ValueHead(
        hidden_size,
        head_type=args.value_head_type,
        dropout=args.value_head_dropout,
        init_std=args.value_head_init_std,
    )


def build_critic(policy: nn.Module, value_model: nn.Module | None, layout: str, args):
    """Return `(critic_backbone_or_None, value_head)` for the layout."""
    if layout == "separate":
        if value_model is None:
            if is_peft_model(policy) or getattr(policy, "is_quantized", False):
                raise ValueError(
                    "value_head='separate' without a `value_model` copies the policy, which is not possible for a "
                    "PEFT or quantized policy. Use value_head='adapter' (one base for both) or pass a `value_model`."
                )
            critic = copy.deepcopy(backbone_of(policy))
            return critic, build_value_head(args, hidden_size_of(policy))
        critic = backbone_of(value_model)
        score = getattr(value_model, "score", None)
        if isinstance(score, nn.Module) and critic is not value_model:
            # a sequence-classification critic (e.g. initialised from a reward model) keeps its trained head
            return critic, ScoreHead(score)
        return critic, build_value_head(args, hidden_size_of(value_model))
    return None, build_value_head(args, hidden_size_of(policy))
