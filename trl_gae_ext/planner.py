"""GPU memory planner for PPO with a 4-bit QLoRA policy, critic and reference on one base model.

`estimate_ppo_memory(config, ...)` reads only a model *config* (never weights) and returns a `MemoryEstimate`: a
per-component breakdown in bytes, the peak over the three phases of a PPO iteration (generation, no-grad scoring,
training), `fits(gpu_gib)` and `suggestions(gpu_gib)`. `plan_main(argv)` is the `trl-gae plan` command.

The estimate follows what this package does: one 4-bit base for the policy (LoRA), the critic (a second LoRA +
value head) and the reference (adapters off); the policy and critic graphs of one micro-batch live together until
the joint backward. Settings choose between today's trainer path (`kbit_upcast=True`: PEFT's
`prepare_model_for_kbit_training` makes the embeddings, lm_head, norms and hence the whole residual stream fp32;
`logprob_chunk_size=None`: full `[B, R + 1, V]` logits) and the recommended one (bf16 stream, log-probs from the
hidden states in chunks, `trl_gae_ext.logprobs`). The training phase is the largest of the moments that can peak
(log-prob forward/backward, critic forward, each graph's layer backward). Every formula and constant is written out,
with how it was measured (the CPU allocator's records of real PPO iterations), in `docs/memory.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# shapes, exact parameter and weight counts and config loading live in model_shapes; they stay importable from here
from .model_shapes import (  # noqa: F401
    DTYPE_BYTES,
    LINEAR_NAMES,
    REFERENCE_CONFIGS,
    SUPPORTED_MODEL_TYPES,
    ModelShape,
    ParamCounts,
    PlanError,
    count_parameters,
    dtype_bytes,
    load_model_config,
    lora_parameters,
    nf4_bytes,
    targeted_names,
    weight_bytes,
)


GIB = 1024**3

VALUE_HEAD_LAYOUTS = ("adapter", "shared", "separate")
# Persistent optimizer state per trainable parameter (bytes): AdamW keeps exp_avg and exp_avg_sq in fp32.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}

ADAPTER_BYTES = 4  # PEFT casts LoRA weights to fp32 (autocast_adapter_dtype=True), so do their inputs
# Log-probs (`logprob_bytes`), bytes per element, measured on the CPU with the allocator's records (docs/memory.md):
ENTROPY_ROWS = 128  # TRL's `entropy_from_logits` works on 128 rows at a time (off the GPU's fused kernel) ...
ENTROPY_SCRATCH_BYTES = 12  # ... each with 3 float32 [rows, V] temporaries: log-softmax, exp, product
CHUNK_FORWARD_BYTES = 8  # chunked log-probs, per chunk x V: float32 logits + logsumexp's x - max scratch
CHUNK_ENTROPY_BYTES = 12  # ... with the entropy: + its exp and the negated product
CHUNK_BACKWARD_BYTES = 8  # ... backward: the rebuilt logits and their softmax
DEFAULT_LOGPROB_CHUNK_SIZE = (
    512  # = trl_gae_ext.logprobs.DEFAULT_CHUNK_SIZE (not imported: the planner needs no torch)
)
# One layer's recompute + backward on top of its saved tensors, per token, by stream bytes: (per H, per I). The peak
# is in the MLP's backward: the gradients of the MLP product and of gate/up, with PEFT's fp32 LoRA temporaries.
# Fitted on the allocator's records of 4 tiny shapes (H 64/128 x I 256-704, docs/memory.md); the bf16 stream's were
# refitted on the trainer's `kbit_upcast=False` path (the 4-bit base only frozen, nothing cast).
LAYER_BACKWARD_BYTES = {4: (-6.2, 10.5, -467), 2: (1.17, 5.13, 103)}
# No-grad forward transient of one layer per token, by stream bytes: (per H, per I, per token). The MLP's LoRA outputs
# are fp32 (PEFT keeps adapters in fp32), so its I-sized temporaries cost more than the stream's bytes; the constant
# is the attention's mask and per-head rows at the fitted lengths. Fitted on the CPU allocator's records (same shapes).
INFERENCE_LAYER_BYTES = {4: (12.25, 15.25, 392), 2: (8.25, 11.25, 392)}
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
FRAGMENTATION = 0.10  # caching-allocator reserve over the allocated peak


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
    kbit_upcast: bool = False
    logprob_chunk_size: int | None = DEFAULT_LOGPROB_CHUNK_SIZE
    device: str = "cuda"
    reference_adapter: bool = True

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
    reference_adapter: int  # the frozen `ref` copy of the policy adapter: weights only, no gradients or states
    value_head: int
    optimizer_states: int
    gradients: int
    activations: int  # layers of one micro-batch in backward: every graph's stored tensors + one layer's working set
    logits: int  # peak of the log-prob working set in training (full logits + fp32 log-softmax, or one chunk)
    logits_saved: int  # the part of `logits` kept for backward, alive while the layers run backward
    policy_activations: int  # the policy graph's stored activations alone: alive at the log-prob peaks
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
    training_moments: dict[str, int] = field(default_factory=dict)  # training working set at each candidate peak
    training_peak_at: str = ""  # the moment that sets the training phase

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
            ("reference adapter ('ref', frozen copy, fp32)", self.reference_adapter),
            ("value head (fp32)", self.value_head),
            (f"optimizer states ({s.optimizer})", self.optimizer_states),
            ("gradients (fp32)", self.gradients),
            (f"activations (train, micro-batch {s.micro_batch})", self.activations),
            (
                ("log-probs, one chunk of " + str(s.logprob_chunk_size) + " (train)")
                if s.logprob_chunk_size
                else "full logits + fp32 log-softmax (train)",
                self.logits,
            ),  # fmt: skip
            (f"KV cache (generation, {'fp32' if s.activation_bytes == 4 else s.dtype})", self.kv_cache),
            ("generation workspace", self.generation_workspace),
            ("scoring workspace (no-grad passes)", self.scoring_workspace),
            ("4-bit dequantization buffer", self.dequant_workspace),
        ] + ([(f"CUDA context + {FRAGMENTATION:.0%} fragmentation", self.cuda_overhead)] if s.device == "cuda" else [])

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
    kbit_upcast: bool = False,
    logprob_chunk_size: int | None = DEFAULT_LOGPROB_CHUNK_SIZE,
    device: str = "cuda",
    reference_adapter: bool = True,
    model_name: str | None = None,
) -> MemoryEstimate:
    """Estimate the GPU memory of one PPO iteration (generation, scoring, training) on one device.

    `config`: a `PretrainedConfig`, a config dict, a `ModelShape`, or a name/path accepted by `load_model_config`.
    `batch_size` is the rollout batch per device; training runs micro-batches of `micro_batch_size` (default
    `batch_size // num_mini_batches`). `value_head`: "adapter" (critic = second LoRA adapter on the shared base),
    "shared" (head on the policy's hidden states), "separate" (critic = its own copy of the base + LoRA).
    `rollout_forward_batch_size` is PPOConfig's `local_rollout_forward_batch_size` (chunks of generation and
    scoring). `kbit_upcast`: the non-quantized weights of a 4-bit base (embeddings, lm_head, norms) are upcast to
    fp32 (PEFT's `prepare_model_for_kbit_training`), which makes the residual stream, KV cache and logits fp32 too;
    False keeps them in `dtype`. `logprob_chunk_size`: PPOConfig's field of that name, log-probs computed from the
    hidden states in chunks of that many positions (`trl_gae_ext.logprobs.chunked_logprobs`), None for the full
    `[B, R, V]` logits. `device`: "cuda" adds the CUDA context and the caching allocator's reserve, and counts TRL's
    fused Triton log-softmax kernel on the unchunked path; "cpu" is what the CPU allocator holds (what
    `benchmarks/memory_cpu.py` measures). `reference_adapter`: the trainer gives a PEFT policy a frozen copy of its
    adapter, `ref`, as the reference policy whenever a KL term is used (`kl_coef > 0`, the default, or the adaptive KL
    callback); False for `kl_coef=0`. Its scoring pass is a no-grad log-prob pass like the policy's.
    """
    name = model_name
    if isinstance(config, (str, os.PathLike)):
        config, name, _ = load_model_config(config)
    target = lora_target if isinstance(lora_target, str) else tuple(lora_target)
    settings = PlanSettings(
        batch_size, prompt_length, response_length, load_in_4bit, lora_r, target, value_head,
        gradient_checkpointing, num_mini_batches, micro_batch_size, optimizer, dtype,
        rollout_forward_batch_size, double_quant, kbit_upcast, logprob_chunk_size, device, reference_adapter,
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
    dtype_bytes(s.dtype)
    if s.device not in ("cuda", "cpu"):
        raise ValueError(f"`device={s.device!r}` is not 'cuda' or 'cpu'.")
    if s.logprob_chunk_size is not None and s.logprob_chunk_size < 1:
        raise ValueError(f"`logprob_chunk_size` must be >= 1 or None, got {s.logprob_chunk_size}.")
    if not 1 <= s.micro_batch <= s.batch_size:
        raise ValueError(f"`micro_batch_size` must be in [1, batch_size={s.batch_size}], got {s.micro_batch}.")


def _estimate(shape: ModelShape, s: PlanSettings, name: str) -> MemoryEstimate:
    d, a, counts = dtype_bytes(s.dtype), s.activation_bytes, count_parameters(shape)
    n_bases = 2 if s.value_head == "separate" else 1
    n_adapters = 1 if s.value_head == "shared" else 2
    lora = lora_parameters(shape, s.lora_r, s.lora_target)
    trainable = n_adapters * lora + shape.hidden_size + 1  # value head: Linear(H, 1) with bias
    upcast = s.load_in_4bit and s.kbit_upcast
    e = dict(
        base_weights=n_bases * weight_bytes(shape, s.load_in_4bit, s.dtype, s.double_quant, upcast),
        adapters=n_adapters * lora * ADAPTER_BYTES,
        # PEFT makes the `ref` adapter like the policy's (same rank and targets, fp32) on the policy's base
        reference_adapter=lora * ADAPTER_BYTES if s.reference_adapter else 0,
        value_head=(shape.hidden_size + 1) * 4,
        optimizer_states=trainable * OPTIMIZER_STATE_BYTES[s.optimizer],
        gradients=trainable * 4,
        kv_cache=kv_cache_bytes(shape, _gen_batch(s), s.prompt_length + s.response_length, a),
        generation_workspace=_generation_workspace(shape, s),
        scoring_workspace=_scoring_workspace(shape, s),
        # bitsandbytes dequantizes a 4-bit weight to the compute dtype for each matmul, on the GPU and the CPU alike
        dequant_workspace=max(o * i for o, i in counts.linear_shapes) * d if s.load_in_4bit else 0,
    )
    e.update(_training_terms(shape, s, e["gradients"]))
    static = (
        e["base_weights"]
        + e["adapters"]
        + e["reference_adapter"]
        + e["value_head"]
        + e["optimizer_states"]
        + e["dequant_workspace"]
    )
    moment = max(e["training_moments"], key=e["training_moments"].get)
    allocated = {
        "generation": static + e["kv_cache"] + e["generation_workspace"],
        "scoring": static + e["scoring_workspace"],
        "training": static + e["training_moments"][moment],
    }
    phases = {k: v + _overhead(v, s.device) for k, v in allocated.items()}
    peak_phase = max(phases, key=phases.get)
    return MemoryEstimate(
        model_name=name, shape=shape, settings=s, num_parameters=counts.total, trainable_parameters=trainable,
        cuda_overhead=_overhead(allocated[peak_phase], s.device), phases=phases, phases_allocated=allocated,
        peak=phases[peak_phase], peak_phase=peak_phase, peak_allocated=allocated[peak_phase], training_peak_at=moment,
        **e,
    )  # fmt: skip


def _overhead(allocated: int, device: str = "cuda") -> int:
    return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated) if device == "cuda" else 0


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
    names = targeted_names(shape, lora_target)
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


def logprob_bytes(shape: ModelShape, s: PlanSettings, batch: int, grad: bool) -> dict[str, int]:
    """Bytes of the log-probs of `batch` sequences' `R` response tokens (`PolicyValueModel.forward`), at the moments
    that matter: `forward` (its own peak), `alive` (kept until the forward returns: while the critic runs),
    `saved` (kept for backward: while the layers run backward) and `backward` (the peak of its backward).

    Unchunked (`logprob_chunk_size=None`): the model's logits of the last `R + 1` positions (`a` bytes), their
    float32 `/ temperature` copy `z` (kept for backward), the `.float()` copy of bf16 logits during the division.
    On the CPU TRL loops: `selective_log_softmax` takes one row's `logsumexp` at a time (its `x - max` scratch,
    `4*R*V`), `entropy_from_logits` 128 rows at a time (log-softmax, exp, product: `12*128*V`), and backward holds the
    per-row gradients, their stack and the gather's scattered gradient: `12*N*V` (`N = batch * R`). On a GPU TRL
    runs its fused Triton kernel: no scratch, backward = `z` + its gradient, `8*N*V`.
    Chunked (`trl_gae_ext.logprobs.chunked_logprobs`, chunks of `c` positions): the scored hidden states copied to
    `[N, H]` and kept; per chunk float32 logits + logsumexp's scratch (`8*c*V`), `12*c*V` with the entropy
    (its exp and the negated product); backward rebuilds the logits and their softmax (`8*c*V`) next to the
    hidden states' gradient. Measured on the CPU with the allocator's records (`docs/memory.md`).
    """
    r, v, a = s.response_length, shape.vocab_size, s.activation_bytes
    n = batch * r
    if s.logprob_chunk_size is None:
        logits, z = a * batch * (r + 1) * v, 4 * n * v
        fused = s.device == "cuda"
        scratch = 0 if fused else (ENTROPY_SCRATCH_BYTES * min(ENTROPY_ROWS, n) * v if grad else 4 * r * v)
        forward = logits + z + max(4 * n * v if a != 4 else 0, scratch)
        return dict(forward=forward, alive=logits + z, saved=z, backward=(8 if fused else 12) * n * v)
    c = min(s.logprob_chunk_size, n)
    hidden = n * shape.hidden_size * a
    chunk = (CHUNK_ENTROPY_BYTES if grad else CHUNK_FORWARD_BYTES) * c * v
    return dict(forward=hidden + chunk, alive=hidden, saved=hidden, backward=2 * hidden + CHUNK_BACKWARD_BYTES * c * v)


def _training_terms(shape: ModelShape, s: PlanSettings, gradients: int) -> dict[str, Any]:
    """The training step of one micro-batch: policy forward (log-probs, entropy), critic forward, joint backward
    (critic graph first: it was built last), AdamW. Each moment that can be the peak, in bytes above the weights,
    adapters and optimizer states. Gradients exist from the first backward to `zero_grad`: in the forward moments
    only when micro-batches accumulate into one optimizer step."""
    a, h = s.activation_bytes, shape.hidden_size
    tokens = s.micro_batch * (s.prompt_length + s.response_length)
    n_graphs = 1 if s.value_head == "shared" else 2  # policy and critic graphs live together until backward
    full = layer_activation_bytes(shape, s.lora_r, s.lora_target, DTYPE_BYTES[s.dtype], fp32_stream=a == 4)
    # checkpointing keeps each layer's input and recomputes one layer at a time in backward
    stored = tokens * shape.num_layers * (a * h if s.gradient_checkpointing else full)
    recomputed = tokens * full if s.gradient_checkpointing else 0
    policy_outside = tokens * _outside_layers_bytes(shape, s, with_values=False)
    all_outside = tokens * _outside_layers_bytes(shape, s, with_values=True)
    c_h, c_i, c_0 = LAYER_BACKWARD_BYTES[a]
    backward_transient = tokens * int(c_h * h + c_i * shape.intermediate_size + c_0)
    lp = logprob_bytes(shape, s, s.micro_batch, grad=True)
    # Gradients appear as backward reaches each parameter; all of them exist in a forward only when micro-batches
    # accumulate. The critic's backward runs first (its graph was built last), so the critic's adapter gradients
    # exist when the policy's backward starts.
    all_grads = gradients if s.batch_size // (s.micro_batch * s.num_mini_batches) > 1 else 0
    critic_grads = max(all_grads, gradients // 2 if n_graphs == 2 else 0)
    layer_backward = recomputed + backward_transient
    moments = {
        "policy log-probs forward": all_grads + stored + policy_outside + lp["forward"],
        "policy log-probs backward": critic_grads + stored + policy_outside + lp["backward"],
    }
    if n_graphs == 2:  # the critic's forward runs while the policy's log-prob tensors are still alive
        infer = tokens * _inference_layer_bytes(shape, s)
        moments["critic forward"] = all_grads + 2 * stored + policy_outside + lp["alive"] + infer
        moments["critic layers backward"] = all_grads + 2 * stored + all_outside + lp["saved"] + layer_backward
        moments["policy layers backward"] = critic_grads + stored + policy_outside + layer_backward
    else:
        moments["policy layers backward"] = all_grads + stored + all_outside + lp["saved"] + layer_backward
    return dict(
        activations=n_graphs * stored + all_outside + recomputed + backward_transient,
        policy_activations=stored,
        logits=max(lp["forward"], lp["backward"]),
        logits_saved=lp["saved"],
        training_moments=moments,
    )


def _outside_layers_bytes(shape: ModelShape, s: PlanSettings, with_values: bool) -> int:
    """Bytes per token the graphs keep outside the decoder layers. The policy's: its final RMSNorm's fp32 input (4H)
    and the rotary cos/sin (`a * head_dim`). `with_values` adds the critic's (after the critic forward): its own
    final norm input (4H, unless the shared layout reads the policy's) and the value head's fp32 input (on an fp32
    stream a view that keeps the whole last hidden state, 4H; on a bf16 stream a copy of the R + 1 scored positions
    plus the bf16 hidden state it was cut from). Measured with the allocator: 12H + 4hd per token on the fp32
    stream, ~11H on the bf16 one (R/T = 1/4), adapter layout."""
    a, h, seq = s.activation_bytes, shape.hidden_size, s.prompt_length + s.response_length
    policy = 4 * h + a * shape.head_dim
    if not with_values:
        return policy
    value_input = 4 * h if a == 4 else 4 * h * (s.response_length + 1) // seq + a * h
    return policy + (0 if s.value_head == "shared" else 4 * h) + value_input


def _inference_layer_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """No-grad forward: the largest transient of one layer per token (MLP gate/up/act/product, LoRA outputs)."""
    c_h, c_i, c_0 = INFERENCE_LAYER_BYTES[s.activation_bytes]
    return int(c_h * shape.hidden_size + c_i * shape.intermediate_size + c_0)


def _gen_batch(s: PlanSettings) -> int:
    return min(s.batch_size, s.rollout_forward_batch_size)


def _generation_workspace(shape: ModelShape, s: PlanSettings) -> int:
    """The larger of the prefill's per-layer transient and a decoding step's next-token logits (one position's
    logits, `logits_to_keep=1`, + fp32 copy, processed scores, probabilities); they never coexist."""
    b = _gen_batch(s)
    prefill = b * s.prompt_length * _inference_layer_bytes(shape, s)
    next_token_logits = b * shape.vocab_size * (s.activation_bytes + 3 * 4)
    return max(prefill, next_token_logits)


def _scoring_workspace(shape: ModelShape, s: PlanSettings) -> int:
    """No-grad policy, critic and reference passes over one chunk of `b` sequences: the larger of a log-prob pass
    and the critic pass (a layer's transient). Without gradients nothing of the log-prob pass outlives it but the
    `[b, R]` log-probs, so the two never add up."""
    b, seq, a = _gen_batch(s), s.prompt_length + s.response_length, s.activation_bytes
    lp = logprob_bytes(shape, s, b, grad=False)
    # the chunked path reads the last hidden states [b, T, H] beside its chunks; the shared layout asks the model for
    # every layer's hidden states (the critic reads them too)
    hidden = b * seq * shape.hidden_size * a * (shape.num_layers + 1 if s.value_head == "shared" else 1)
    if s.value_head == "shared":
        return hidden + lp["forward"]
    critic = b * seq * _inference_layer_bytes(shape, s)
    if s.logprob_chunk_size is not None:
        return max(hidden + lp["forward"], critic)
    return max(lp["forward"], critic)


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
    if s.logprob_chunk_size is None:
        kinds["logprobs"] = [(f"logprob_chunk_size={DEFAULT_LOGPROB_CHUNK_SIZE} (no full-vocabulary logits)",
                              replace(s, logprob_chunk_size=DEFAULT_LOGPROB_CHUNK_SIZE))]  # fmt: skip
    if s.load_in_4bit and s.kbit_upcast:
        kinds["upcast"] = [("--no-kbit-upcast (embeddings, lm_head and activations in bf16)",
                            replace(s, kbit_upcast=False))]  # fmt: skip
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
    if s.optimizer == "adamw":
        kinds["optimizer"] = [('optim="adamw_bnb_8bit" (8-bit AdamW states)', replace(s, optimizer="adamw_8bit"))]
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
        f"  rollout batch {s.batch_size} = micro batch {s.micro_batch} x {s.batch_size // s.micro_batch} "
        f"(per_device_train_batch_size={s.micro_batch}, num_mini_batches={s.num_mini_batches}), prompt "
        f"{s.prompt_length} + response {s.response_length} tokens, value head {s.value_head!r}, gradient "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.dtype}, log-probs "
        f"{f'in chunks of {s.logprob_chunk_size}' if s.logprob_chunk_size else 'from full logits'}"
        f"{', fp32 upcast' if s.load_in_4bit and s.kbit_upcast else ''}; trainable {est.trainable_parameters / 1e6:.1f}M",
        f"  {'component':<54}{'GiB':>7}",
    ]
    lines += [f"    {label:<52}{_gib(n)}" for label, n in est.components()]
    moments = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.training_moments.items())
    lines.append(f"  training working set (above weights, adapters, optimizer states) at: {moments}")
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
    parser.add_argument("--num-mini-batches", type=int, default=2,
                        help="optimizer steps per rollout batch; micro batch = batch / this (default 2: 8 = 4 x 2)")  # fmt: skip
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
    parser.add_argument("--kbit-upcast", action=argparse.BooleanOptionalAction, default=False,
                        help="embeddings, lm_head and norms of the 4-bit base upcast to fp32 (PEFT's "
                             "prepare_model_for_kbit_training): fp32 activations, KV cache and logits")  # fmt: skip
    parser.add_argument("--logprob-chunk-size", type=int, default=DEFAULT_LOGPROB_CHUNK_SIZE,
                        help="PPOConfig.logprob_chunk_size: positions per chunk of log-probs; 0 = full logits")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: what the CPU allocator holds (no CUDA context, fragmentation or fused kernels)")  # fmt: skip
    return parser


def add_plan_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on an `argparse` subparsers object; the command runs `run_plan(args)` via `args.func`."""
    parser = subparsers.add_parser("plan", help="estimate the GPU memory of a PPO run from a model config")
    build_plan_parser(parser)
    parser.set_defaults(func=run_plan)
    return parser


_PLAN_ARGS = ("batch_size", "prompt_length", "response_length", "load_in_4bit", "lora_r", "gradient_checkpointing",
              "num_mini_batches", "micro_batch_size", "optimizer", "dtype", "rollout_forward_batch_size",
              "kbit_upcast", "device")  # fmt: skip


def run_plan(args: argparse.Namespace) -> int:
    try:
        config, name, note = load_model_config(args.model)
        layouts = VALUE_HEAD_LAYOUTS if args.value_head == "all" else (args.value_head,)
        kwargs = {key: getattr(args, key) for key in _PLAN_ARGS}
        kwargs["logprob_chunk_size"] = args.logprob_chunk_size or None
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
