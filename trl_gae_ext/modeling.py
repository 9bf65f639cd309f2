"""Model layout: the policy, the critic (value head on one of three backbones) and the reference policy.

Critic layouts (`PPOConfig.value_head`):
- `shared`: the value head reads the policy's last hidden state; one forward gives logits and values.
- `adapter`: the policy is a `PeftModel`; a second LoRA adapter named `critic` on the same base gives the critic's
  hidden states, so one copy of the base weights serves policy, critic and reference (the point of the 4-bit QLoRA
  setup).
- `separate`: the critic is its own backbone (a `value_model`, or a copy of the policy's initial weights).

The reference policy of a PEFT policy is a frozen adapter named `ref`, a copy of the policy adapter as training
starts (`qlora.attach_adapters`); any other policy gets a frozen copy of the model (`ref_model`).

`PolicyValueModel.forward` computes whatever the PPO step needs in one call, so DDP sees a single forward.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from trl.trainer.utils import entropy_from_logits, selective_log_softmax, use_adapter

from .logprobs import DEFAULT_CHUNK_SIZE, chunked_logprobs
from .value_head import ValueHead


CRITIC_ADAPTER = "critic"
REF_ADAPTER = "ref"
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
    try:
        with use_adapter(model, name):
            for p, flag in flags:
                p.requires_grad_(flag)
            yield
    finally:  # also when an exception leaves the block: checkpoint's early stop ends a recompute with one
        for p, flag in flags:
            p.requires_grad_(flag)


class _RecomputeWithAdapter:
    """Recompute context of one checkpointed layer: re-activates the PEFT adapter that was active when the layer ran
    forward, entered only if another one is active now. Reusable, since a second backward recomputes again."""

    def __init__(self, model, adapter: str, inner=None):
        self.model, self.adapter, self.inner = model, adapter, inner
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        if self.inner is not None:
            stack.enter_context(self.inner)
        if self.model.active_adapter != self.adapter:
            stack.enter_context(adapter_active(self.model, self.adapter))
        self._stack.append(stack)

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


def adapter_checkpoint_kwargs(policy, kwargs: dict | None) -> dict:
    """`torch.utils.checkpoint` kwargs for a PEFT policy whose adapters switch between forwards (`adapter` layout).

    Backward recomputes a checkpointed layer after the forward's `adapter_active` has exited, so the critic's layers
    would be recomputed with the policy adapter and the critic LoRA would learn from the wrong activations. The
    non-reentrant checkpoint calls `context_fn` at forward time: its recompute context re-activates the adapter of
    that forward. A user's own `context_fn` is kept, its recompute context entered first.
    """
    kwargs = dict(kwargs or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "value_head='adapter' with gradient checkpointing needs non-reentrant checkpointing (reentrant "
            "checkpointing cannot recompute the critic's layers with the critic adapter active): drop "
            "`use_reentrant=True` from `gradient_checkpointing_kwargs`, or use value_head='shared' or 'separate'."
        )
    user_context_fn = kwargs.get("context_fn")

    def context_fn():
        forward_ctx, recompute_ctx = user_context_fn() if user_context_fn is not None else (None, None)
        recompute = _RecomputeWithAdapter(policy, policy.active_adapter, inner=recompute_ctx)
        return forward_ctx if forward_ctx is not None else contextlib.nullcontext(), recompute

    kwargs.update(use_reentrant=False, context_fn=context_fn)
    return kwargs


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


# Config fields that make a causal LM's logits something other than `lm_head(last_hidden_state)`: Gemma 2/3's final
# logit softcapping, Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`. None and
# 1.0 leave the logits alone; any other value sends scoring through the model's own forward (full logits).
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def chunkable_lm_head(model: nn.Module) -> nn.Module | None:
    """The output layer of `model` when its logits are exactly `lm_head(backbone(...).last_hidden_state)`, so that
    `chunked_logprobs` can compute log-probs from the hidden states; None when they are not (a logit transform in
    the config, no separate backbone or output layer): the caller then takes the model's own logits."""
    base = model.get_base_model() if is_peft_model(model) else model
    if not isinstance(base, PreTrainedModel) or backbone_of(base) is base:
        return None
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORM_FIELDS):
        return None
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Module):
        return None
    weight = getattr(head, "weight", None)
    # a ZeRO-3 partition (`ds_id`, numel 0 outside the module's own forward) or an FSDP2 shard (DTensor) is gathered
    # only by the module's forward hooks, which the chunked path bypasses: these take the model's own logits
    if weight is None or hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
        return None
    return head


class ResponseScores(NamedTuple):
    """Shape: `logprobs`, `entropy`: `[B, R]` float32, 0 on padding (`entropy` None unless asked for);
    `hidden`: `[B, P + R, H]` last hidden states, or None unless asked for."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    hidden: torch.Tensor | None


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    num_response_tokens: int,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
    entropy_grad: bool = False,
    return_hidden: bool = False,
) -> ResponseScores:
    """Log-probs (and entropies) of the last `num_response_tokens` tokens under `softmax(logits / temperature)`.

    With a `chunk_size`, the backbone's last hidden states go through `chunked_logprobs`, so the `[B, R, V]` logits
    never exist (one `[chunk_size, V]` block at a time, recomputed in backward). `chunk_size=None`, or a model whose
    logits are not a plain projection of the hidden states (`chunkable_lm_head`), takes the model's own logits.
    Padding positions (`attention_mask == 0`) give 0 either way and no gradient.
    """
    r = num_response_tokens
    targets, mask = input_ids[:, -r:], attention_mask[:, -r:].bool()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    head = chunkable_lm_head(model) if chunk_size is not None else None
    if head is not None:
        hidden = backbone_of(model)(**kwargs).last_hidden_state
        scores = chunked_logprobs(
            hidden[:, -r - 1 : -1], head, targets, temperature, mask, chunk_size, return_entropy, entropy_grad
        )
        return ResponseScores(scores.logprobs, scores.entropy, hidden if return_hidden else None)
    result = model(**kwargs, logits_to_keep=r + 1, output_hidden_states=return_hidden)
    logits = result.logits[:, :-1].float() / temperature
    logprobs = selective_log_softmax(logits, targets, row_mask=mask)
    entropy = None
    if return_entropy:  # a logged statistic unless the loss has an entropy bonus
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits).masked_fill(~mask, 0.0)
    return ResponseScores(logprobs, entropy, result.hidden_states[-1] if return_hidden else None)


class PolicyValueModel(nn.Module):
    """Policy + critic as one module, the `model` a `transformers.Trainer` optimizes and checkpoints.

    `logprob_chunk_size` tokens at a time go through the lm_head when log-probs are computed (`response_logprobs`);
    None computes the full logits.
    """

    def __init__(
        self,
        policy: nn.Module,
        value_head: nn.Module,
        layout: str,
        critic: nn.Module | None = None,
        logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        if layout == "separate" and critic is None:
            raise ValueError("The 'separate' critic layout needs a critic backbone.")
        if layout == "adapter" and not is_peft_model(policy):
            raise ValueError("The 'adapter' critic layout needs a PEFT policy: pass a `peft_config`.")
        self.policy = policy
        self.value_head = value_head
        self.critic = critic
        self.layout = layout
        self.logprob_chunk_size = logprob_chunk_size
        # `scale_scores="first"`: the divisor of the scores, fitted at the first varied rollout; the critic's values
        # are in these units, so it is saved and loaded with the critic (`saving`)
        self.score_scale: float | None = None

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
        train_policy: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Log-probs, entropies and values of the last `num_response_tokens` tokens.

        `train_policy=False` (critic warm-up) lets no gradient reach the policy: in the `shared` layout the backbone
        then runs without gradients and only the value head learns.

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
            scored = response_logprobs(
                self.policy, input_ids, attention_mask, position_ids, r, temperature, self.logprob_chunk_size,
                return_entropy=compute_entropy, entropy_grad=entropy_grad,
                return_hidden=compute_values and self.layout == "shared",
            )  # fmt: skip
            out["logprobs"] = scored.logprobs
            if compute_entropy:
                out["entropy"] = scored.entropy
            hidden = scored.hidden
        if compute_values:
            if hidden is None:
                # the shared backbone is the policy: values that must not train it read it without gradients
                frozen = self.layout == "shared" and not train_policy
                with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                    hidden = self._critic_hidden(input_ids, attention_mask, position_ids)
            elif not train_policy:
                hidden = hidden.detach()
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

    @property
    def has_reference_adapter(self) -> bool:
        return is_peft_model(self.policy) and REF_ADAPTER in self.policy.peft_config

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, num_response_tokens, temperature=1.0, ref_model=None):
        """Log-probs under the reference policy: `ref_model` if given, else the PEFT policy's frozen `ref` adapter."""
        if ref_model is None:
            if not self.has_reference_adapter:
                raise ValueError(
                    "No reference policy: pass `ref_model`, or give a PEFT policy its `ref` adapter "
                    "(`qlora.attach_adapters(..., with_reference=True)`)."
                )
            with adapter_active(self.policy, REF_ADAPTER):
                return self.forward(input_ids, attention_mask, num_response_tokens, temperature, compute_values=False)[
                    "logprobs"
                ]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return response_logprobs(
            ref_model, input_ids, attention_mask, position_ids, num_response_tokens, temperature,
            self.logprob_chunk_size,
        ).logprobs  # fmt: skip

    # -- Trainer integration -----------------------------------------------------------------------------------
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        if self.layout == "adapter":
            kwargs = adapter_checkpoint_kwargs(self.policy, kwargs)
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
