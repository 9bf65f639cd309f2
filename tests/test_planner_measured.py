"""The memory planner against memory measured on the CPU: one real PPO iteration of `PPOTrainer` (4-bit NF4 base by
bitsandbytes, policy and critic LoRA adapters, value head) per configuration, the peak bytes the CPU allocator holds in
each phase (generation, scoring, training) next to `estimate_ppo_memory(..., device="cpu")` for the same shapes.

The configurations are chosen so that a different moment sets the training peak in each (the full-vocabulary
log-softmax, the checkpointed layers' backward, accumulated micro-batches), at shapes where the phase working sets are a
large part of the total. `benchmarks/memory_cpu.py` runs the same measurement at the Qwen2.5-0.5B/1.5B shapes.
"""

import pytest
import torch
from conftest import load_benchmark


pytest.importorskip("bitsandbytes")

from trl_gae_ext.planner import estimate_ppo_memory  # noqa: E402


TOLERANCE = 0.15

# a Qwen2-style shape; the MLP is 5.5x the hidden size, as in Qwen2.5
SHAPE = dict(hidden_size=64, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CASES = {
    # full logits (logprob_chunk_size=None), fp32 upcast; the entropy's log-softmax of 128 rows sets the training peak
    "logits-fp32": dict(shape=dict(vocab_size=4096), batch_size=2, prompt_length=32, response_length=16),
    # a bf16 stream (no fp32 upcast), long prompts, small vocabulary: the critic's checkpointed layers set the peak
    "layers-bf16": dict(shape=dict(vocab_size=256), batch_size=4, prompt_length=64, response_length=16, kbit_upcast=False),
    # micro-batches of 2 accumulated into one optimizer step
    "micro-batches": dict(shape=dict(vocab_size=1024), batch_size=4, prompt_length=48, response_length=16, micro_batch_size=2),
    # chunked log-probs (PPOConfig.logprob_chunk_size)
    "chunked": dict(shape=dict(vocab_size=4096), batch_size=2, prompt_length=32, response_length=16, logprob_chunk_size=8),
    # the recommended QLoRA path: bf16 stream and chunked log-probs
    "chunked-bf16": dict(
        shape=dict(vocab_size=4096), batch_size=4, prompt_length=32, response_length=16, logprob_chunk_size=8,
        kbit_upcast=False,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def benchmarks():
    return load_benchmark("memory_gpu"), load_benchmark("memory_cpu")


@pytest.fixture
def one_thread():
    # on a shared CPU, intra-op threads mostly wait on each other; the measured bytes do not depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_planner_matches_measured_phases(name, benchmarks, one_thread):
    memory_gpu, memory_cpu = benchmarks
    case = dict(CASES[name])
    config = {**memory_cpu.TINY_CONFIG, **SHAPE, **case.pop("shape")}
    chunk = case.pop("logprob_chunk_size", None)
    upcast = case.pop("kbit_upcast", True)
    model = memory_gpu.build_random_4bit_model(config, torch.device("cpu"))
    # plain SGD keeps no optimizer state, so one PPO iteration shows every phase as the planner counts it
    measured = memory_cpu.measure_ppo_phases(
        model, memory_gpu.build_tokenizer(config["vocab_size"]), iterations=1, optim="sgd", kbit_upcast=upcast,
        logprob_chunk_size=chunk, **case,
    )  # fmt: skip
    planned = estimate_ppo_memory(
        config, **case, optimizer="sgd", kbit_upcast=upcast, logprob_chunk_size=chunk, device="cpu"
    )
    weights = planned.base_weights + planned.adapters + planned.reference_adapter + planned.value_head
    for phase in memory_cpu.PHASES:
        bytes_, expected = measured[phase], planned.phases_allocated[phase]
        assert bytes_ == pytest.approx(expected, rel=TOLERANCE), (phase, bytes_, expected, planned.training_peak_at)
        # the bytes above the weights (what the phase itself adds) hold the same tolerance
        assert bytes_ - weights == pytest.approx(expected - weights, rel=TOLERANCE), phase
