"""GPU memory planner for PPO with a 4-bit QLoRA policy, critic and reference on one base model.

`estimate_ppo_memory(config, ...)` reads only a model *config* (never weights) and returns a `MemoryEstimate`: a
per-component breakdown in bytes, the peak over the three phases of a PPO iteration (generation, no-grad scoring,
training), `fits(gpu_gib)` and `suggestions(gpu_gib)`. `plan_main(argv)` is the `trl-gae plan` command.

The estimate follows what this package does: the 4-bit base goes through PEFT's `prepare_model_for_kbit_training`
(`qlora.load_policy`), so everything that is not a quantized Linear (embeddings, lm_head, norms) and hence the
residual stream, KV cache and logits are fp32; the policy and critic graphs of one micro-batch live together until
the joint backward; log-probs come from `logits_to_keep = R + 1`. Every formula and constant is written out, with
how it was measured, in `docs/memory.md`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# the shapes and config loading live in model_shapes; REFERENCE_CONFIGS, PlanError and load_model_config stay
# importable from here
from .model_shapes import REFERENCE_CONFIGS, PlanError, as_config, load_model_config


GIB = 1024**3

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VALUE_HEAD_LAYOUTS = ("adapter", "shared", "separate")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Persistent optimizer state per trainable parameter (bytes): AdamW keeps exp_avg and exp_avg_sq in fp32.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}

ADAPTER_BYTES = 4  # PEFT casts LoRA weights to fp32 (autocast_adapter_dtype=True), so do their inputs
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
NF4_NESTED_BLOCKSIZE = 256  # double quantization: the absmax are 8-bit quantized in blocks of 256
NF4_TENSOR_OVERHEAD_NESTED = 1024 + 64 + 4  # per tensor: nested 8-bit code, NF4 code (16 fp32), offset
NF4_TENSOR_OVERHEAD = 64  # per tensor without double quantization: the NF4 code
# Logits: the package's forward asks for `logits_to_keep = R + 1` and takes `selective_log_softmax` of
# `logits.float() / temperature`. Bytes per [micro batch, R, V] element, measured on the CPU (docs/memory.md):
# peak 14.7-16.2 with gradients (fp32 scaled logits + fp32 gradient buffers); after the forward only the fp32
# scaled logits stay alive for backward (4). Without gradients (scoring): the model's logits + the fp32 scaled copy
# (+ the fp32 upcast when the logits are bf16), measured 8.0 for the fp32 stream.
TRAIN_LOGIT_BYTES = 16
SAVED_LOGIT_BYTES = 4
# No-grad forward transient per token and per (H + I), by activation bytes: measured 12 (bf16) and 16 (fp32 stream).
INFERENCE_LAYER_BYTES = {2: 12, 4: 16}
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
FRAGMENTATION = 0.10  # caching-allocator reserve over the allocated peak


# -- model shape and exact parameter counts --------------------------------------------------------------------------


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
    counts, d = count_parameters(config), _dtype_bytes(dtype)
    if not load_in_4bit:
        return counts.total * d
    other = 4 if upcast_non_quantized else d
    return sum(nf4_bytes(o * i, double_quant) for o, i in counts.linear_shapes) + counts.other * other


def lora_parameters(config, r: int, target: str | Sequence[str] = "all-linear") -> int:
    """Parameters of one LoRA adapter: r * (in + out) per targeted linear ("all-linear" excludes lm_head)."""
    shape = ModelShape.from_config(config)
    linears = shape.linears()
    return shape.num_layers * sum(r * (linears[n][0] + linears[n][1]) for n in _targeted_names(shape, target))


# -- the estimate ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    batch_size: int
    prompt_length: int
    response_length: int
    load_in_4bit: bool = True
    lora_r: int = 16
    lora_target: str | tuple[str, ...] = "all-linear"
    value_head: str = "adapter"
    gradient_checkpointing: bool = True
    num_mini_batches: int = 1
    micro_batch_size: int | None = None
    optimizer: str = "adamw"
    dtype: str = "bfloat16"
    rollout_forward_batch_size: int = 64
    double_quant: bool = True
    kbit_upcast: bool = True

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or max(1, self.batch_size // self.num_mini_batches)

    @property
    def activation_bytes(self) -> int:
        """Bytes per element of the residual stream, KV cache and logits. `prepare_model_for_kbit_training` (which
        `trl_gae_ext.qlora.load_policy` calls on a 4-bit model) makes the embeddings fp32, and bitsandbytes casts
        each Linear4bit output back to its input's dtype, so the whole stream is fp32 in the QLoRA setup."""
        return 4 if self.load_in_4bit and self.kbit_upcast else DTYPE_BYTES[self.dtype]


@dataclass
class MemoryEstimate:
    """Bytes per component and per phase; `peak` is the largest phase including the CUDA overhead."""

    model_name: str
    shape: ModelShape
    settings: PlanSettings
    num_parameters: int
    trainable_parameters: int
    base_weights: int
    adapters: int
    value_head: int
    optimizer_states: int
    gradients: int
    activations: int  # training forward/backward of one micro-batch (all critic/policy graphs)
    logits: int  # peak of the logits (last R + 1 positions) + fp32 log-softmax working set, one micro-batch
    logits_saved: int  # the part of `logits` alive while the layers run backward (fp32 scaled logits)
    policy_activations: int  # the policy graph's stored activations alone: alive at the logits peak
    kv_cache: int  # generation
    generation_workspace: int  # prefill transients + next-token logits
    scoring_workspace: int  # no-grad log-prob/value passes: logits + transients of one chunk
    dequant_workspace: int  # one dequantized 4-bit weight (largest linear) during a matmul
    cuda_overhead: int  # of the peak phase: context + fragmentation
    phases: dict[str, int] = field(default_factory=dict)  # allocated + overhead per phase
    phases_allocated: dict[str, int] = field(default_factory=dict)  # comparable to torch.cuda.max_memory_allocated
    peak: int = 0
    peak_phase: str = ""
    peak_allocated: int = 0  # comparable to torch.cuda.max_memory_allocated()

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= gpu_gib * GIB

    def suggestions(self, gpu_gib: float) -> list[str]:
        """Changes that lower the peak, each with its new peak; empty when the plan already fits."""
        return [] if self.fits(gpu_gib) else _suggest(self, gpu_gib)

    def components(self) -> list[tuple[str, int]]:
        s = self.settings
        n_adapters = 1 if s.value_head == "shared" else 2
        quant = ("NF4 4-bit" + (" + double quant" if s.double_quant else "")) if s.load_in_4bit else s.dtype
        if s.load_in_4bit and s.kbit_upcast:
            quant += ", rest fp32"
        copies = " x2 (separate critic)" if s.value_head == "separate" else ""
        return [
            (f"base weights ({quant}){copies}", self.base_weights),
            (f"LoRA adapters ({n_adapters} x r={s.lora_r}, fp32)", self.adapters),
            ("value head (fp32)", self.value_head),
            (f"optimizer states ({s.optimizer})", self.optimizer_states),
            ("gradients (fp32)", self.gradients),
            (f"activations (train, micro-batch {s.micro_batch})", self.activations),
            ("logits + fp32 log-softmax (train)", self.logits),
            (f"KV cache (generation, {'fp32' if s.activation_bytes == 4 else s.dtype})", self.kv_cache),
            ("generation workspace", self.generation_workspace),
            ("scoring workspace (no-grad passes)", self.scoring_workspace),
            ("4-bit dequantization buffer", self.dequant_workspace),
            (f"CUDA context + {FRAGMENTATION:.0%} fragmentation", self.cuda_overhead),
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_report(self, gpu_gib: float | None = None) -> str:
        return _format_report(self, gpu_gib)


def estimate_ppo_memory(
    config,
    *,
    batch_size: int,
    prompt_length: int,
    response_length: int,
    load_in_4bit: bool = True,
    lora_r: int = 16,
    lora_target: str | Sequence[str] = "all-linear",
    value_head: str = "adapter",
    gradient_checkpointing: bool = True,
    num_mini_batches: int = 1,
    micro_batch_size: int | None = None,
    optimizer: str = "adamw",
    dtype: str = "bfloat16",
    rollout_forward_batch_size: int = 64,
    double_quant: bool = True,
    kbit_upcast: bool = True,
    model_name: str | None = None,
) -> MemoryEstimate:
    """Estimate the GPU memory of one PPO iteration (generation, scoring, training) on one device.

    `config`: a `PretrainedConfig`, a config dict, a `ModelShape`, or a name/path accepted by `load_model_config`.
    `batch_size` is the rollout batch per device; training runs micro-batches of `micro_batch_size` (default
    `batch_size // num_mini_batches`). `value_head`: "adapter" (critic = second LoRA adapter on the shared base),
    "shared" (head on the policy's hidden states), "separate" (critic = its own copy of the base + LoRA).
    `rollout_forward_batch_size` is PPOConfig's `local_rollout_forward_batch_size` (chunks of generation and
    scoring). `kbit_upcast`: the 4-bit base went through `prepare_model_for_kbit_training`, as in this package
    (fp32 embeddings, head, norms and activations).
    """
    name = model_name
    if isinstance(config, (str, os.PathLike)):
        config, name, _ = load_model_config(config)
    target = lora_target if isinstance(lora_target, str) else tuple(lora_target)
    settings = PlanSettings(
        batch_size, prompt_length, response_length, load_in_4bit, lora_r, target, value_head,
        gradient_checkpointing, num_mini_batches, micro_batch_size, optimizer, dtype,
        rollout_forward_batch_size, double_quant, kbit_upcast,
    )  # fmt: skip
    _validate(settings)
    shape = ModelShape.from_config(config)
    return _estimate(shape, settings, name or shape.model_type)


def _validate(s: PlanSettings) -> None:
    for name in ("batch_size", "prompt_length", "response_length", "lora_r", "num_mini_batches",
                 "rollout_forward_batch_size"):  # fmt: skip
        if getattr(s, name) < 1:
            raise ValueError(f"`{name}` must be >= 1, got {getattr(s, name)}.")
    if s.value_head not in VALUE_HEAD_LAYOUTS:
        raise ValueError(f"`value_head={s.value_head!r}` is not one of {', '.join(VALUE_HEAD_LAYOUTS)}.")
    if s.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"`optimizer={s.optimizer!r}` is not one of {', '.join(OPTIMIZER_STATE_BYTES)}.")
    _dtype_bytes(s.dtype)
    if not 1 <= s.micro_batch <= s.batch_size:
        raise ValueError(f"`micro_batch_size` must be in [1, batch_size={s.batch_size}], got {s.micro_batch}.")


def _estimate(shape: ModelShape, s: PlanSettings, name: str) -> MemoryEstimate:
    d, a, counts = _dtype_bytes(s.dtype), s.activation_bytes, count_parameters(shape)
    n_bases = 2 if s.value_head == "separate" else 1
    n_adapters = 1 if s.value_head == "shared" else 2
    n_graphs = 1 if s.value_head == "shared" else 2  # policy and critic graphs live together until backward
    lora = lora_parameters(shape, s.lora_r, s.lora_target)
    trainable = n_adapters * lora + shape.hidden_size + 1  # value head: Linear(H, 1) with bias
    upcast = s.load_in_4bit and s.kbit_upcast
    e = dict(
        base_weights=n_bases * weight_bytes(shape, s.load_in_4bit, s.dtype, s.double_quant, upcast),
        adapters=n_adapters * lora * ADAPTER_BYTES,
        value_head=(shape.hidden_size + 1) * 4,
        optimizer_states=trainable * OPTIMIZER_STATE_BYTES[s.optimizer],
        gradients=trainable * 4,
        activations=_train_activation_bytes(shape, s, n_graphs),
        logits=TRAIN_LOGIT_BYTES * s.micro_batch * s.response_length * shape.vocab_size,
        kv_cache=kv_cache_bytes(shape, _gen_batch(s), s.prompt_length + s.response_length, a),
        generation_workspace=_generation_workspace(shape, s),
        scoring_workspace=_scoring_workspace(shape, s),
        dequant_workspace=max(o * i for o, i in counts.linear_shapes) * d if s.load_in_4bit else 0,
    )
    e["logits_saved"] = SAVED_LOGIT_BYTES * s.micro_batch * s.response_length * shape.vocab_size
    static = e["base_weights"] + e["adapters"] + e["value_head"] + e["optimizer_states"] + e["dequant_workspace"]
    # Backward runs the critic graph (created last) first, with every checkpoint and the policy's saved logits
    # alive; the policy's log-softmax backward (the logits peak) comes after the critic graph is freed.
    e["policy_activations"] = _train_activation_bytes(shape, s, n_graphs=1, stored_only=True)
    training = max(e["activations"] + e["logits_saved"], e["policy_activations"] + e["logits"])
    allocated = {
        "generation": static + e["kv_cache"] + e["generation_workspace"],
        "scoring": static + e["scoring_workspace"],
        "training": static + e["gradients"] + training,
    }
    phases = {k: v + _overhead(v) for k, v in allocated.items()}
    peak_phase = max(phases, key=phases.get)
    return MemoryEstimate(
        model_name=name, shape=shape, settings=s, num_parameters=counts.total, trainable_parameters=trainable,
        cuda_overhead=_overhead(allocated[peak_phase]), phases=phases, phases_allocated=allocated, peak=phases[peak_phase],
        peak_phase=peak_phase, peak_allocated=allocated[peak_phase], **e,
    )  # fmt: skip


def _overhead(allocated: int) -> int:
    return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)


def kv_cache_bytes(config, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * tokens * batch * dtype bytes."""
    shape = ModelShape.from_config(config)
    return 2 * shape.num_layers * shape.kv_dim * seq_len * batch * dtype_bytes


def layer_activation_bytes(
    shape: ModelShape, lora_r: int, lora_target="all-linear", dtype_bytes: int = 2, fp32_stream: bool = False
) -> int:
    """Bytes one decoder layer saves for backward, per token, with fp32 LoRA on `lora_target` (SDPA attention).

    bf16 stream (`fp32_stream=False`): PEFT casts the input of every targeted linear to fp32 separately
    (4 * in_features each). fp32 stream (the QLoRA setup after `prepare_model_for_kbit_training`): no casts; the
    saved inputs are shared (q/k/v read one norm output, gate/up another, o reads SDPA's saved output, down the
    MLP product). Both: LoRA keeps its r-dim fp32 output (4 * r per target); each RMSNorm an fp32 copy of its input
    and its rsqrt; attention rotated q, k, v, the output and SDPA's fp32 logsumexp per head (no T^2 term); the
    SwiGLU MLP gate, act(gate) and up. Frozen base linears keep nothing. Matches saved-tensor hooks exactly.
    """
    names = _targeted_names(shape, lora_target)
    linears = shape.linears()
    h, i = shape.hidden_size, shape.intermediate_size
    act = 4 if fp32_stream else dtype_bytes
    if fp32_stream:
        lora_in = h * bool(names & {"q_proj", "k_proj", "v_proj"}) + h * bool(names & {"gate_proj", "up_proj"})
        lora_in = ADAPTER_BYTES * (lora_in + i * ("down_proj" in names))
    else:
        lora_in = sum(ADAPTER_BYTES * linears[n][0] for n in names)
    lora = lora_in + ADAPTER_BYTES * lora_r * len(names)
    norms = 2 * (4 * h + 4)
    attention = act * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.num_heads
    mlp = 3 * act * i
    return lora + norms + attention + mlp


def _train_activation_bytes(shape: ModelShape, s: PlanSettings, n_graphs: int, stored_only: bool = False) -> int:
    """Activations at the start of backward: `n_graphs` graphs' stored tensors + (unless `stored_only`) one layer
    recomputed (with checkpointing) and the backward transients."""
    a = s.activation_bytes
    tokens = s.micro_batch * (s.prompt_length + s.response_length)
    full = layer_activation_bytes(shape, s.lora_r, s.lora_target, DTYPE_BYTES[s.dtype], fp32_stream=a == 4)
    # Gradients of the residual stream and the MLP intermediate, the head's hidden states, during backward
    # (measured ~22H + 0.9I bytes per token for a bf16 stream on the CPU).
    backward_transient = a * (10 * shape.hidden_size + shape.intermediate_size // 2)
    if s.gradient_checkpointing:  # each graph keeps every layer's input; one layer is recomputed at a time
        stored, working = n_graphs * shape.num_layers * a * shape.hidden_size, full + backward_transient
    else:
        stored, working = n_graphs * shape.num_layers * full, backward_transient
    return tokens * (stored if stored_only else stored + working)


def _inference_layer_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """No-grad forward: the largest transient of one layer per token (MLP gate/up/act/product, LoRA outputs)."""
    return INFERENCE_LAYER_BYTES[s.activation_bytes] * (shape.hidden_size + shape.intermediate_size)


def _gen_batch(s: PlanSettings) -> int:
    return min(s.batch_size, s.rollout_forward_batch_size)


def _generation_workspace(shape: ModelShape, s: PlanSettings) -> int:
    b = _gen_batch(s)
    prefill = b * s.prompt_length * _inference_layer_bytes(shape, s)
    # `generate` keeps one position's logits (logits_to_keep=1) + fp32 copy, processed scores, probabilities
    next_token_logits = b * shape.vocab_size * (s.activation_bytes + 3 * 4)
    return prefill + next_token_logits


def _scoring_workspace(shape: ModelShape, s: PlanSettings) -> int:
    b, seq = _gen_batch(s), s.prompt_length + s.response_length
    a = s.activation_bytes
    logits = (a + 4 + (4 if a != 4 else 0)) * b * s.response_length * shape.vocab_size
    return logits + b * seq * _inference_layer_bytes(shape, s)


def _targeted_names(shape: ModelShape, target) -> set[str]:
    if target == "all-linear":
        return set(LINEAR_NAMES)
    names = {target} if isinstance(target, str) else set(target)
    unknown = sorted(names - set(shape.linears()))
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {unknown}; use 'all-linear' or names among {', '.join(LINEAR_NAMES)}."
        )
    return names


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"`dtype={dtype!r}` is not one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]


# -- suggestions -----------------------------------------------------------------------------------------------------


def _candidates(s: PlanSettings) -> dict[str, list[tuple[str, PlanSettings]]]:
    """One-change alternatives by kind, kinds in order of preference, each kind's options from mild to strong."""
    kinds: dict[str, list[tuple[str, PlanSettings]]] = {}
    if not s.gradient_checkpointing:
        kinds["checkpointing"] = [("--gradient-checkpointing", replace(s, gradient_checkpointing=True))]
    if not s.load_in_4bit:
        kinds["4bit"] = [("--load-in-4bit (NF4 base weights)", replace(s, load_in_4bit=True))]
    if s.value_head == "separate":
        kinds["layout"] = [
            ('value_head="adapter" (critic = second adapter on one base)', replace(s, value_head="adapter"))
        ]
    sizes = [s.micro_batch // 2**k for k in range(1, 8) if s.micro_batch // 2**k >= 1]
    kinds["micro_batch"] = [
        (f"micro batch {mb} (per_device_train_batch_size={mb}, gradient_accumulation_steps="
         f"{max(1, s.batch_size // (mb * s.num_mini_batches))})", replace(s, micro_batch_size=mb))
        for mb in sizes
    ]  # fmt: skip
    chunks = [_gen_batch(s) // 2**k for k in range(1, 8) if _gen_batch(s) // 2**k >= 1]
    kinds["chunk"] = [
        (f"local_rollout_forward_batch_size={b} (smaller no-grad generation/scoring chunks)",
         replace(s, rollout_forward_batch_size=b))
        for b in chunks
    ]  # fmt: skip
    ranks = [s.lora_r // 2**k for k in range(1, 5) if s.lora_r // 2**k >= 4]
    kinds["rank"] = [(f"--lora-r {r} (smaller LoRA rank)", replace(s, lora_r=r)) for r in ranks]
    if s.value_head == "adapter":
        kinds["shared"] = [('value_head="shared" (one adapter, one graph)', replace(s, value_head="shared"))]
    lengths = [s.response_length // 2**k for k in range(1, 6) if s.response_length // 2**k >= 32]
    kinds["length"] = [(f"--response-length {n} (shorter responses)", replace(s, response_length=n)) for n in lengths]
    return {k: v for k, v in kinds.items() if v}


def _best_of_kind(est: MemoryEstimate, options, gpu_gib: float) -> tuple[str, MemoryEstimate] | None:
    """The mildest option that fits, else the strongest one that lowers the peak, else None."""
    scored = [(text, _estimate(est.shape, settings, est.model_name)) for text, settings in options]
    fitting = [(text, alt) for text, alt in scored if alt.fits(gpu_gib)]
    if fitting:
        return fitting[0]
    text, alt = min(scored, key=lambda o: o[1].peak)
    return (text, alt) if alt.peak < est.peak else None


def _suggest(est: MemoryEstimate, gpu_gib: float) -> list[str]:
    lines, fitting = [], set()
    for kind, options in _candidates(est.settings).items():
        best = _best_of_kind(est, options, gpu_gib)
        if best is not None:
            text, alt = best
            fitting |= {kind} if alt.fits(gpu_gib) else set()
            lines.append(f"{text}: peak {alt.peak / GIB:.1f} GiB ({'fits' if alt.fits(gpu_gib) else 'too large'})")
    if not fitting - {"length"}:  # shorter responses change the task: offer a combination of the others too
        lines.append(_combine(est, gpu_gib))
    return lines


def _combine(est: MemoryEstimate, gpu_gib: float) -> str:
    """Apply the kinds in order of preference, each as little as fits or as much as helps, until it fits."""
    current, chosen = est, []
    for kind in _candidates(est.settings):
        options = _candidates(current.settings).get(kind, [])
        best = _best_of_kind(current, options, gpu_gib) if options else None
        if best is None:
            continue
        text, current = best
        chosen.append(text.split(" (")[0])
        if current.fits(gpu_gib):
            return f"combined: {'; '.join(chosen)}: peak {current.peak / GIB:.1f} GiB (fits)"
    return "no combination of these changes fits: use a GPU with more memory or a smaller model"


# -- report and cli --------------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:7.2f}"


def _format_report(est: MemoryEstimate, gpu_gib: float | None) -> str:
    s, shape = est.settings, est.shape
    lines = [
        f"PPO memory plan for {est.model_name} ({shape.model_type}, {est.num_parameters / 1e9:.2f}B parameters: "
        f"{shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads}/{shape.num_kv_heads} heads, "
        f"vocab {shape.vocab_size})",
        f"  rollout batch {s.batch_size} (micro batch {s.micro_batch}), prompt {s.prompt_length} + response "
        f"{s.response_length} tokens, value head {s.value_head!r}, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, {s.dtype}; trainable {est.trainable_parameters / 1e6:.1f}M",
        f"  {'component':<54}{'GiB':>7}",
    ]
    lines += [f"    {label:<52}{_gib(n)}" for label, n in est.components()]
    lines.append(
        f"  training = weights, adapters, optimizer + gradients + max(activations + {est.logits_saved / GIB:.2f} saved "
        f"logits, {est.policy_activations / GIB:.2f} policy activations + logits)"
    )
    lines.append("  phase peaks (incl. overhead): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.phases.items()))
    verdict = f"  peak: {est.peak / GIB:.2f} GiB ({est.peak_phase})"
    if gpu_gib is not None:
        free = gpu_gib - est.peak / GIB
        verdict += f" -> fits in {gpu_gib:g} GiB ({free:.2f} GiB spare)" if est.fits(gpu_gib) else (
            f" -> does NOT fit in {gpu_gib:g} GiB ({-free:.2f} GiB over)"
        )  # fmt: skip
    lines.append(verdict)
    if gpu_gib is not None and not est.fits(gpu_gib):
        lines.append("  suggestions:")
        lines += [f"    - {text}" for text in est.suggestions(gpu_gib)]
    return "\n".join(lines)


def build_plan_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trl-gae plan", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help=f"hub id, local model dir, config.json, or a built-in shape: {', '.join(REFERENCE_CONFIGS)}")  # fmt: skip
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GPU memory in GiB (default 24)")
    parser.add_argument("--batch-size", type=int, default=8, help="rollout batch per device (default 8)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="training micro batch (default: batch)")
    parser.add_argument("--num-mini-batches", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--response-length", type=int, default=512)
    parser.add_argument("--rollout-forward-batch-size", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--value-head", choices=(*VALUE_HEAD_LAYOUTS, "all"), default="adapter",
                        help="critic layout; 'all' compares the three")  # fmt: skip
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE_BYTES), default="adamw")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--kbit-upcast", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit base prepared by prepare_model_for_kbit_training, as trl_gae_ext does (fp32 rest)")  # fmt: skip
    return parser


def add_plan_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on an `argparse` subparsers object; the command runs `run_plan(args)` via `args.func`."""
    parser = subparsers.add_parser("plan", help="estimate the GPU memory of a PPO run from a model config")
    build_plan_parser(parser)
    parser.set_defaults(func=run_plan)
    return parser


_PLAN_ARGS = ("batch_size", "prompt_length", "response_length", "load_in_4bit", "lora_r", "gradient_checkpointing",
              "num_mini_batches", "micro_batch_size", "optimizer", "dtype", "rollout_forward_batch_size",
              "kbit_upcast")  # fmt: skip


def run_plan(args: argparse.Namespace) -> int:
    try:
        config, name, note = load_model_config(args.model)
        layouts = VALUE_HEAD_LAYOUTS if args.value_head == "all" else (args.value_head,)
        kwargs = {key: getattr(args, key) for key in _PLAN_ARGS}
        estimates = [estimate_ppo_memory(config, value_head=v, model_name=name, **kwargs) for v in layouts]
    except (PlanError, ValueError) as err:
        print(f"trl-gae plan: error: {err}", file=sys.stderr)
        return 2
    if note:
        print(f"note: {note}")
    print(estimates[0].format_report(args.gpu_memory))
    if len(estimates) > 1:
        gpu = args.gpu_memory
        cells = [
            f"{e.settings.value_head} {e.peak / GIB:.2f} GiB{'' if e.fits(gpu) else ' (too large)'}" for e in estimates
        ]
        print("  value-head layouts: " + ", ".join(cells))
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    """`trl-gae plan ...`: print the memory report; 0 on success, 2 on a bad argument or model."""
    try:
        args = build_plan_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argparse error (2, message already printed)
        return int(exit_.code or 0)
    return run_plan(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main())
