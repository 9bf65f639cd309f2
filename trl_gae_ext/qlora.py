"""Loading the policy, optionally in 4 bits, and putting the policy and critic LoRA adapters on one shared base.

One quantized base serves three roles: the policy (PEFT's `default` adapter), the critic (a `critic` adapter plus
an fp32 value head) and the reference policy (a frozen `ref` adapter, the policy adapter as training starts).
bitsandbytes is imported only when 4-bit is used.
"""

from __future__ import annotations

import copy
import json
import logging

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl.trainer.utils import create_model_from_path

from .modeling import CRITIC_ADAPTER, REF_ADAPTER


logger = logging.getLogger(__name__)


def model_init_kwargs(args) -> dict:
    kwargs = args.model_init_kwargs or {}
    if isinstance(kwargs, str):  # from the CLI
        kwargs = json.loads(kwargs)
    return dict(kwargs)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_policy(model, args, quantization_config=None) -> PreTrainedModel:
    """Load `model` (an id or path) as a causal LM with `args.model_init_kwargs`, or take a loaded model as is.

    A quantized model's weights are frozen, its unquantized ones cast to float32 only with `args.kbit_upcast`
    (`prepare_model_for_kbit_training`), and activation checkpointing is resolved (`resolve_activation_checkpointing`).
    """
    if isinstance(model, str):
        kwargs = model_init_kwargs(args)
        if quantization_config is not None:
            require_bitsandbytes()
            kwargs["quantization_config"] = quantization_config
            kwargs.setdefault("dtype", getattr(quantization_config, "bnb_4bit_compute_dtype", None) or "auto")
        model = create_model_from_path(model, AutoModelForCausalLM, **kwargs)
    elif quantization_config is not None:
        raise ValueError(
            "`quantization_config` applies when `model` is an id or a path. Pass the id, or load the model "
            "quantized yourself (`from_pretrained(..., quantization_config=...)`) and drop `quantization_config`."
        )
    if is_quantized(model) and not getattr(model, "_hf_peft_config_loaded", False):
        if getattr(args, "kbit_upcast", False):
            from peft import prepare_model_for_kbit_training

            # checkpointing is left to `PolicyValueModel.activation_checkpointing_enable`, which the Trainer calls: it
            # sets the checkpoint kwargs the critic layout needs
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            # All or nothing: float32 norms alone would make the residual stream float32 (bitsandbytes returns its
            # input's dtype), which a compute-dtype lm_head cannot multiply. Measured in docs/ppo.md: no PPO gain.
            model.requires_grad_(False)
    resolve_activation_checkpointing(args, model)
    return model


def resolve_activation_checkpointing(args, model) -> None:
    """Turn activation checkpointing on for a 4-bit/8-bit policy when the user left it unset (None): a QLoRA run is
    run for its memory, and checkpointing is most of the activation saving. An explicit True or False is kept."""
    if getattr(args, "activation_checkpointing", False) is None:
        args.activation_checkpointing = args.gradient_checkpointing = is_quantized(model)


def _extra_adapter_config(config):
    """The config of a second adapter on a base that already carries the policy adapter. Inits computed from the base
    weights (PiSSA, OLoRA, CorDA, LoftQ, ...) rewrite those weights, which the policy adapter was fitted to, so the
    second adapter starts with PEFT's default init instead (only "gaussian" and "orthogonal" leave the base alone)."""
    config = copy.deepcopy(config)
    config.inference_mode = False
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and init not in ("gaussian", "orthogonal"):
        config.init_lora_weights = True
    return config


def _add_reference_adapter(model) -> None:
    """A frozen copy of the policy adapter as training starts, named `ref`: the reference policy. A loaded adapter (an
    SFT LoRA) or a non-identity init (PiSSA, `init_lora_weights=False`) makes the base with adapters disabled a
    different policy; this copy also works on a quantized base, where merging is impossible."""
    policy_adapter = model.active_adapter
    if REF_ADAPTER not in model.peft_config:
        # Older PEFT (0.18) marks every adapter but the active one frozen in add_adapter: keep the caller's flags.
        trainable = [(p, p.requires_grad) for p in model.parameters()]
        model.add_adapter(REF_ADAPTER, _extra_adapter_config(model.peft_config[policy_adapter]))
        for param, flag in trainable:
            param.requires_grad_(flag)
    params = dict(model.named_parameters())
    tag = f".{policy_adapter}."
    with torch.no_grad():
        for name, param in params.items():
            if tag in name:
                params[name.replace(tag, f".{REF_ADAPTER}.")].copy_(param)
    for name, param in params.items():
        if f".{REF_ADAPTER}." in name:
            param.requires_grad_(False)


def require_bitsandbytes() -> None:
    """bitsandbytes is an optional dependency (the `qlora` extra): say which install line brings it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Loading a 4-bit/8-bit base (QLoRA) needs bitsandbytes, which is not installed: "
            'pip install "trl-gae-ext[qlora]"'
        ) from err


def attach_adapters(model, peft_config, with_critic: bool, with_reference: bool = False):
    """Wrap `model` with the policy LoRA adapter and, for the `adapter` layout, a second `critic` adapter; with
    `with_reference`, a frozen `ref` adapter that copies the policy adapter (the reference policy).

    Policy and critic adapters train together: PEFT marks only the active adapter trainable, so every LoRA parameter
    but the reference's is set trainable explicitly.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        if peft_config is None:
            return model
        model = get_peft_model(model, peft_config)
    if with_critic and CRITIC_ADAPTER not in model.peft_config:
        model.add_adapter(
            CRITIC_ADAPTER, _extra_adapter_config(peft_config or model.peft_config[model.active_adapter])
        )
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    if with_reference:
        _add_reference_adapter(model)
    return model


def consumer_gpu_defaults(compute_dtype: torch.dtype = torch.bfloat16, lora_r: int = 16):
    """Recommended 4-bit + LoRA settings for one consumer GPU: NF4, double quantization, bf16 compute, LoRA on all
    linear layers. Returns `(BitsAndBytesConfig, LoraConfig)`."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    lora = LoraConfig(
        r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return quantization, lora
