"""Model shapes without weights: resolve a model argument to its config, and count its parameters and weight bytes
exactly, for the memory planner.

`load_model_config(model)` accepts a `PretrainedConfig`, a dict, a built-in reference shape (`REFERENCE_CONFIGS`,
usable offline), a local model directory, a config.json path, or a hub id (read with `AutoConfig`; offline, hub ids
of the reference shapes fall back to the built-in config). `ModelShape`, `count_parameters`, `weight_bytes`
(bitsandbytes NF4 included) and `lora_parameters` are exact counts. Nothing here reads weights or estimates activation memory: that is `planner`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any


# Reference shapes, usable by name offline (`trl-gae plan --model qwen2.5-7b`), from the models' public config.json
# (their parameter counts match the checkpoints' safetensors index sizes exactly; see the tests). Only the shape
# numbers matter to the planner; the rest makes them valid transformers configs for benchmarks/memory_gpu.py.
_QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, tie_word_embeddings=False,
               hidden_act="silu", max_position_embeddings=131072, rope_theta=1000000.0, bos_token_id=151643,
               eos_token_id=151643, torch_dtype="bfloat16")  # fmt: skip
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    # the small Qwen2.5 shapes tie lm_head to the embeddings; benchmarks/memory_cpu.py measures them on the CPU
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6},
    "llama-3.1-8b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
                     "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "qwen2.5-14b": {**_QWEN25, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-5},
    "qwen2.5-32b": {**_QWEN25, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-5},
}  # fmt: skip

# Hub ids with the same shapes as a reference config: used only when the hub cannot be reached.
HUB_ALIASES = {
    f"{org}/{name}{suffix}".lower(): key
    for key, (org, name) in {"qwen2.5-0.5b": ("Qwen", "Qwen2.5-0.5B"), "qwen2.5-1.5b": ("Qwen", "Qwen2.5-1.5B"),
                             "qwen2.5-7b": ("Qwen", "Qwen2.5-7B"), "llama-3.1-8b": ("meta-llama", "Llama-3.1-8B"),
                             "qwen2.5-14b": ("Qwen", "Qwen2.5-14B"), "qwen2.5-32b": ("Qwen", "Qwen2.5-32B")}.items()
    for suffix in ("", "-Instruct")
}  # fmt: skip


class PlanError(ValueError):
    """A model argument the planner cannot turn into a config; the message is one line for the CLI."""


def load_model_config(model) -> tuple[Any, str, str | None]:
    """Resolve `model` to (config, display name, note) without loading weights.

    Accepts a `PretrainedConfig`, a dict, a reference name (see `REFERENCE_CONFIGS`), a local model directory, a
    config.json path, or a hub id (read with `AutoConfig`; offline, hub ids of the reference shapes fall back to
    the built-in config, with a note). Raises `PlanError` with a one-line message otherwise.
    """
    if not isinstance(model, (str, os.PathLike)):
        return model, getattr(model, "model_type", None) or "config", None
    text = str(model)
    if text.lower() in REFERENCE_CONFIGS:
        return dict(REFERENCE_CONFIGS[text.lower()]), text.lower(), None
    path = Path(text).expanduser()
    if path.is_file():
        return _read_json_config(path), text, None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"no config.json in directory {text!r}")
        return _read_json_config(path / "config.json"), text, None
    if text.endswith(".json") or text.startswith((".", "/", "~")) or text.count("/") > 1:  # hub ids: org/name
        raise PlanError(f"no such file or directory: {text!r}")
    return _load_from_hub(text)


def _read_json_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"cannot read model config {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise PlanError(f"{str(path)!r} is not a JSON object")
    return data


def _load_from_hub(model_id: str) -> tuple[Any, str, str | None]:
    alias = HUB_ALIASES.get(model_id.lower())
    known = ", ".join(REFERENCE_CONFIGS)
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(model_id), model_id, None
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if alias:
        return dict(REFERENCE_CONFIGS[alias]), model_id, f"hub unavailable ({reason}); using built-in {alias!r} shape"
    raise PlanError(
        f"cannot load the config of {model_id!r}: not a built-in shape ({known}), not a local directory or "
        f"config.json, and the hub lookup failed ({reason})"
    )


def _hub_unreachable_reason() -> str | None:
    """A fast offline check, so the CLI fails in milliseconds instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be resolved: offline?"
    return None


def as_config(config):
    """A dict becomes a transformers config (its defaults fill the gaps); unknown types a namespace."""
    if isinstance(config, Mapping):
        data = dict(config)
        if data.get("model_type"):
            try:
                from transformers import AutoConfig

                config = AutoConfig.for_model(**data)
            except (ValueError, KeyError, ImportError):
                config = SimpleNamespace(**data)
        else:
            config = SimpleNamespace(**data)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
NF4_NESTED_BLOCKSIZE = 256  # double quantization: the absmax are 8-bit quantized in blocks of 256
NF4_TENSOR_OVERHEAD_NESTED = 1024 + 64 + 4  # per tensor: nested 8-bit code, NF4 code (16 fp32), offset
NF4_TENSOR_OVERHEAD = 64  # per tensor without double quantization: the NF4 code


# -- model shape, exact parameter and weight counts --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama/Qwen2/Mistral/Qwen3-style decoder that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a `PretrainedConfig`, a dict or a `ModelShape`. Unknown model types are read as Llama-style."""
        if isinstance(config, ModelShape):
            return config
        config = as_config(config)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if getattr(config, k, None) is None]
        if missing:
            raise PlanError(f"the model config lacks {', '.join(missing)}: not a decoder-only transformer config")
        model_type = getattr(config, "model_type", None) or "llama"
        if model_type not in SUPPORTED_MODEL_TYPES:
            warnings.warn(
                f"model_type {model_type!r} is counted as a Llama-style decoder (supported exactly: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}); the estimate is approximate.",
                stacklevel=2,
            )
        hidden, heads = config.hidden_size, config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            hidden_size=hidden,
            intermediate_size=getattr(config, "intermediate_size", None) or 4 * hidden,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # Qwen2 hard-codes biases on q/k/v only; Llama/Qwen3 follow `attention_bias` on q/k/v/o.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            model_type=model_type,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per-layer nn.Linear modules: name -> (in_features, out_features, has_bias)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias),
            "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias),
            "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the causal LM (what `sum(p.numel() for p in model.parameters())` gives)."""

    total: int
    linear_weights: int  # the decoder layers' nn.Linear weights: what bitsandbytes quantizes
    other: int  # embeddings, lm_head (unless tied), norms, biases: kept in the compute dtype
    linear_shapes: tuple[tuple[int, int], ...]  # (out, in) of each quantized weight, one entry per layer and linear


def count_parameters(config) -> ParamCounts:
    shape = ModelShape.from_config(config)
    linear_shapes, biases = [], 0
    for _ in range(shape.num_layers):
        for d_in, d_out, bias in shape.linears().values():
            linear_shapes.append((d_out, d_in))
            biases += d_out if bias else 0
    norms = shape.num_layers * (2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0))
    norms += shape.hidden_size  # final norm
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    linear_weights = sum(o * i for o, i in linear_shapes)
    other = embeddings + norms + biases
    return ParamCounts(linear_weights + other, linear_weights, other, tuple(linear_shapes))


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes NF4 weight: packed 4-bit data plus its quantization state."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if double_quant:  # absmax as uint8 + one fp32 absmax per 256 blocks
        state = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_TENSOR_OVERHEAD_NESTED
    else:  # absmax in fp32
        state = 4 * blocks + NF4_TENSOR_OVERHEAD
    return math.ceil(numel / 2) + state


def weight_bytes(
    config,
    load_in_4bit: bool = True,
    dtype: str = "bfloat16",
    double_quant: bool = True,
    upcast_non_quantized: bool = False,
) -> int:
    """Bytes of the base model's weights. In 4-bit, lm_head, embeddings, norms and biases stay in `dtype` as
    `from_pretrained` loads them, or fp32 after PEFT's `prepare_model_for_kbit_training` (`upcast_non_quantized`)."""
    counts, d = count_parameters(config), dtype_bytes(dtype)
    if not load_in_4bit:
        return counts.total * d
    other = 4 if upcast_non_quantized else d
    return sum(nf4_bytes(o * i, double_quant) for o, i in counts.linear_shapes) + counts.other * other


def lora_parameters(config, r: int, target: str | Sequence[str] = "all-linear") -> int:
    """Parameters of one LoRA adapter: r * (in + out) per targeted linear ("all-linear" excludes lm_head)."""
    shape = ModelShape.from_config(config)
    linears = shape.linears()
    return shape.num_layers * sum(r * (linears[n][0] + linears[n][1]) for n in targeted_names(shape, target))


def targeted_names(shape: ModelShape, target) -> set[str]:
    if target == "all-linear":
        return set(LINEAR_NAMES)
    names = {target} if isinstance(target, str) else set(target)
    unknown = sorted(names - set(shape.linears()))
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {unknown}; use 'all-linear' or names among {', '.join(LINEAR_NAMES)}."
        )
    return names


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"`dtype={dtype!r}` is not one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]
