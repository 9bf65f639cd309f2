"""Model shapes without weights: resolve a model argument to its config for the memory planner.

`load_model_config(model)` accepts a `PretrainedConfig`, a dict, a built-in reference shape (`REFERENCE_CONFIGS`,
usable offline), a local model directory, a config.json path, or a hub id (read with `AutoConfig`; offline, hub ids
of the reference shapes fall back to the built-in config). Nothing here reads weights or estimates memory: that is
`planner`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    for key, (org, name) in {"qwen2.5-7b": ("Qwen", "Qwen2.5-7B"), "llama-3.1-8b": ("meta-llama", "Llama-3.1-8B"),
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
