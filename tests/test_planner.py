"""Tests of the memory planner: exact counts against transformers/PEFT/bitsandbytes, formulas, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MistralConfig, Qwen2Config

from trl_gae_ext import planner
from trl_gae_ext.planner import (
    GIB,
    REFERENCE_CONFIGS,
    ModelShape,
    build_plan_parser,
    count_parameters,
    estimate_ppo_memory,
    layer_activation_bytes,
    lora_parameters,
    plan_main,
    weight_bytes,
)


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)

# One table of tiny configs for the exact parameter counts: GQA, tied/untied, every bias layout.
CONFIG_TABLE = {
    "llama-gqa-untied": LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-biases": LlamaConfig(**TINY, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "llama-head-dim": LlamaConfig(**TINY, num_key_value_heads=2, head_dim=32),
    "qwen2-untied": Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2-tied": Qwen2Config(**TINY, num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": MistralConfig(**TINY, num_key_value_heads=2),
}


def _numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CONFIG_TABLE))
def test_parameter_count_matches_transformers(name):
    config = CONFIG_TABLE[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = count_parameters(config)
    assert counts.total == _numel(model)
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert counts.linear_weights == linear
    assert count_parameters(config.to_dict()).total == counts.total  # a dict gives the same count


def test_qwen3_parameter_count_with_qk_norm():
    qwen3 = pytest.importorskip("transformers").Qwen3Config(**TINY, num_key_value_heads=2, head_dim=24)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3)
    assert count_parameters(qwen3).total == _numel(model)


def test_reference_shapes_match_published_checkpoint_sizes():
    # "total_size" of each model's model.safetensors.index.json (bf16, 2 bytes per parameter) / 2.
    published = {
        "qwen2.5-7b": 15_231_233_024 // 2,
        "llama-3.1-8b": 16_060_522_496 // 2,
        "qwen2.5-14b": 29_540_067_328 // 2,
        "qwen2.5-32b": 65_527_752_704 // 2,
    }
    for name, total in published.items():
        assert count_parameters(REFERENCE_CONFIGS[name]).total == total, name
    # the small shapes (tied embeddings), against their model cards: 0.49B / 1.54B parameters, of which 0.36B / 1.31B
    # outside the embedding
    for name, total, non_embedding in (("qwen2.5-0.5b", 0.49e9, 0.36e9), ("qwen2.5-1.5b", 1.54e9, 1.31e9)):
        config = REFERENCE_CONFIGS[name]
        count = count_parameters(config).total
        assert (
            round(count, -7) == total
            and round(count - config["vocab_size"] * config["hidden_size"], -7) == non_embedding
        )


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_count_matches_peft(target):
    from peft import LoraConfig, get_peft_model

    config = CONFIG_TABLE["qwen2-untied"]
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=target))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(config, 4, target) == trainable


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, untied head) saved to disk, to be loaded in 4-bit like a real checkpoint."""
    config = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path, config


def _quant_state_bytes(model):
    """Bytes of all quantization-state tensors (absmax, nested absmax, codes, offsets), each storage once."""
    import bitsandbytes as bnb

    storages = {}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            tensors = [qs.absmax, qs.code, qs.offset] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
            for t in tensors:
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weight_bytes_match_bitsandbytes(saved_tiny_model, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    path, config = saved_tiny_model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16)
    # What gets quantized: every decoder Linear, not the embeddings and not lm_head.
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * config.num_hidden_layers and not any("lm_head" in n for n in quantized)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    estimate = weight_bytes(config, load_in_4bit=True, dtype="bfloat16", double_quant=double_quant)
    # get_memory_footprint counts the packed 4-bit data (0.5 byte/weight) and the bf16 rest, not the quant state:
    assert estimate == model.get_memory_footprint(return_buffers=False) + _quant_state_bytes(model)
    # ... so the two agree within the quant state: absmax is 1/64 byte per weight with double quant (3% of the packed
    # data), 4/64 without (12.5%), plus ~1 KB per tensor.
    assert estimate == pytest.approx(model.get_memory_footprint(), rel=0.04 if double_quant else 0.07)


def test_bf16_weight_bytes_match_footprint():
    config = CONFIG_TABLE["llama-biases"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert weight_bytes(config, load_in_4bit=False) == model.get_memory_footprint(return_buffers=False)


def test_layer_activation_formula_matches_saved_tensors():
    """Per-layer saved-for-backward bytes of a bf16 model with fp32 LoRA on all linears, from autograd hooks."""
    from peft import LoraConfig, get_peft_model

    def saved_bytes(num_layers, batch=2, seq=32):
        config = LlamaConfig(**{**TINY, "num_hidden_layers": num_layers}, num_key_value_heads=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).train()
        params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 320, (batch, seq)), output_hidden_states=True, logits_to_keep=1)
        return sum(seen.values()) / (batch * seq), config

    (one, _), (three, config) = saved_bytes(1), saved_bytes(3)
    per_layer = (three - one) / 2
    assert per_layer == layer_activation_bytes(ModelShape.from_config(config), lora_r=8, dtype_bytes=2)


def test_fp32_stream_activation_formula_matches_saved_tensors(tmp_path):
    """The QLoRA path: 4-bit base after prepare_model_for_kbit_training (fp32 stream), fp32 LoRA on all linears."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip

    def saved_bytes(num_layers, batch=2, seq=32):
        config = Qwen2Config(**{**TINY, "num_hidden_layers": num_layers}, num_key_value_heads=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / str(num_layers))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(num_layers), quantization_config=quant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).train()
        params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_base_model().model(input_ids=torch.randint(0, 320, (batch, seq)))
        return sum(seen.values()) / (batch * seq), config

    (one, _), (three, config) = saved_bytes(1), saved_bytes(3)
    per_layer = (three - one) / 2
    assert per_layer == layer_activation_bytes(ModelShape.from_config(config), lora_r=8, fp32_stream=True)


def test_hand_calculation():
    # Llama, H=64, I=128, L=2, 4 heads of 16, 2 KV heads (kv_dim 32), V=100, untied, no biases.
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    # Linear weights per layer: q 64*64=4096, k 64*32=2048, v 2048, o 4096, gate/up/down 64*128=8192 each.
    # 4-bit bytes per weight of n params: n/2 + ceil(n/64) absmax + 4*ceil(ceil(n/64)/256) + 1092 per-tensor state:
    #   4096 -> 2048 + 64 + 4 + 1092 = 3208;  2048 -> 1024 + 32 + 4 + 1092 = 2152;  8192 -> 4096 + 128 + 4 + 1092 = 5320
    #   per layer 2*3208 + 2*2152 + 3*5320 = 26680; two layers 53360
    # bf16 rest: embed 6400 + lm_head 6400 + norms (2 layers * 128 + final 64) = 320 -> 13120 params * 2 = 26240
    assert weight_bytes(config) == 53360 + 26240 == 79600  # as from_pretrained loads it
    # LoRA r=4 per layer: 4*(64+64) + 4*(64+32)*2 + 4*(64+64) + 4*(64+128)*3 = 512 + 768 + 512 + 2304 = 4096; x2 layers
    assert lora_parameters(config, 4) == 8192
    # batch 2, prompt 3 + response 5, adapter layout: 2 adapters (8192 each), value head 65 params. Today's trainer
    # path: prepare_model_for_kbit_training makes the non-quantized 13120 params fp32 (and the residual stream, KV
    # cache and logits fp32), log-probs from full logits; the CPU allocator (no CUDA overhead, TRL's CPU loops).
    est = estimate_ppo_memory(config, batch_size=2, prompt_length=3, response_length=5, lora_r=4, kbit_upcast=True,
                              logprob_chunk_size=None, device="cpu")  # fmt: skip
    assert est.base_weights == 53360 + 13120 * 4 == 105840
    assert est.adapters == 2 * 8192 * 4 == 65536
    assert est.reference_adapter == 8192 * 4  # the frozen `ref` copy of the policy adapter (a KL term is on)
    assert est.value_head == 65 * 4 == 260
    assert est.trainable_parameters == 2 * 8192 + 65 == 16449
    assert est.optimizer_states == 16449 * 8 == 131592
    assert est.gradients == 16449 * 4 == 65796
    # KV: 2 (k, v) * 2 layers * 32 kv_dim * 8 tokens * 2 sequences * 4 bytes
    assert est.kv_cache == 2 * 2 * 32 * 8 * 2 * 4 == 8192
    # log-probs of N = 2 * 5 positions: fp32 logits of R + 1 = 6 positions 4*2*6*100 = 4800, scaled copy 4*10*100 =
    # 4000, the entropy's 3 fp32 [min(128, N), V] temporaries 12*10*100 = 12000 -> forward peak 20800 (backward
    # 12*10*100 = 12000); the scaled copy is kept for backward
    assert est.logits == 4800 + 4000 + 12000 == 20800
    assert est.logits_saved == 4000
    # one layer per token, bf16 stream: LoRA casts 4*(6*64 + 128) + 4*4*7 = 2160; norms 2*(4*64+4) = 520;
    # attention 2*(2*64 + 2*32) + 4*4 = 400; MLP 3*2*128 = 768 -> 3848
    assert layer_activation_bytes(est.shape, 4) == 3848
    # fp32 stream: shared LoRA inputs 4*(64 + 64 + 128) + 4*4*7 = 1136; norms 520; attention 4*(128 + 64) + 16 = 784;
    # MLP 3*4*128 = 1536 -> 3976
    assert layer_activation_bytes(est.shape, 4, fp32_stream=True) == 3976
    # checkpointed, 16 tokens: 2 graphs * 2 layers * 4*64 per token = 8192 each; outside the layers 4*64 + 4*16 (policy)
    # + 4*64 + 4*64 (critic) = 832 per token; one layer recomputed 3976 + backward int(-6.2*64 + 10.5*128 - 467) = 480
    assert est.activations == 2 * 8192 + 16 * 832 + 16 * 3976 + 16 * 480 == 100992
    assert est.training_moments["critic layers backward"] == est.activations + est.logits_saved
    assert est.training_moments["policy log-probs forward"] == 8192 + 16 * (4 * 64 + 4 * 16) + est.logits
    assert est.phases_allocated["training"] == (est.base_weights + est.adapters + est.reference_adapter + est.value_head
                                                + est.optimizer_states + est.dequant_workspace
                                                + max(est.training_moments.values()))  # fmt: skip
    assert est.peak == max(est.phases.values()) and est.cuda_overhead == 0
    # on a GPU: TRL's fused kernel (no entropy temporaries, backward 8*N*V) and the CUDA context + 10%
    gpu = estimate_ppo_memory(config, batch_size=2, prompt_length=3, response_length=5, lora_r=4, kbit_upcast=True,
                              logprob_chunk_size=None, device="cuda")  # fmt: skip
    assert gpu.logits == max(4800 + 4000, 8 * 10 * 100) == 8800
    assert gpu.cuda_overhead == planner.CUDA_CONTEXT_BYTES + int(0.10 * gpu.peak_allocated)
    # chunks of 4 positions: the scored hidden states 10*64*4 = 2560 kept; forward 12*4*100 with the entropy,
    # backward 2560 + their gradient 2560 + 8*4*100
    chunked = estimate_ppo_memory(config, batch_size=2, prompt_length=3, response_length=5, lora_r=4,
                                  kbit_upcast=True, logprob_chunk_size=4, device="cpu")  # fmt: skip
    assert chunked.logits_saved == 2560
    assert chunked.logits == max(2560 + 12 * 400, 2 * 2560 + 8 * 400) == 8320


def test_defaults_follow_the_trainer():
    """The planner's default chunk is the log-prob module's; its defaults are the recommended QLoRA setup."""
    from trl_gae_ext.logprobs import DEFAULT_CHUNK_SIZE

    est = estimate_ppo_memory("qwen2.5-7b", batch_size=8, prompt_length=256, response_length=512)
    assert est.settings.logprob_chunk_size == planner.DEFAULT_LOGPROB_CHUNK_SIZE == DEFAULT_CHUNK_SIZE
    assert not est.settings.kbit_upcast and est.settings.device == "cuda"


REF = dict(batch_size=8, prompt_length=256, response_length=512)


def _peak(model="qwen2.5-7b", **kw):
    return estimate_ppo_memory(REFERENCE_CONFIGS[model], **{**REF, **kw}).peak


@pytest.mark.parametrize(
    "smaller, larger",
    [
        ({"model": "qwen2.5-7b"}, {"model": "qwen2.5-14b"}),
        ({"model": "qwen2.5-14b"}, {"model": "qwen2.5-32b"}),
        ({"batch_size": 4}, {"batch_size": 8}),
        ({"response_length": 256}, {"response_length": 512}),
        ({"prompt_length": 128}, {"prompt_length": 256}),
        ({"gradient_checkpointing": True}, {"gradient_checkpointing": False}),
        ({"load_in_4bit": True}, {"load_in_4bit": False}),
        ({"lora_r": 8}, {"lora_r": 64}),
        ({"micro_batch_size": 2}, {"micro_batch_size": 8}),
    ],
)
def test_peak_is_monotonic(smaller, larger):
    assert _peak(**smaller) < _peak(**larger)


def test_value_head_layouts_are_ordered():
    adapter, shared, separate = (_peak(value_head=v) for v in ("adapter", "shared", "separate"))
    assert separate > adapter >= shared
    assert separate - adapter > 4 * GIB  # a second base model
    assert (adapter - shared) / adapter < 0.25  # a second adapter and graph only


def test_suggestions_when_it_does_not_fit():
    est = estimate_ppo_memory(REFERENCE_CONFIGS["qwen2.5-14b"], **REF, gradient_checkpointing=False)
    assert not est.fits(24)
    suggestions = est.suggestions(24)
    assert any("--gradient-checkpointing" in s for s in suggestions)
    assert any("micro batch" in s for s in suggestions)
    assert any("fits" in s for s in suggestions)
    assert est.fits(1000) and est.suggestions(1000) == []
    separate = estimate_ppo_memory(REFERENCE_CONFIGS["qwen2.5-14b"], **REF, value_head="separate", load_in_4bit=False)
    texts = " ".join(separate.suggestions(24))
    assert 'value_head="adapter"' in texts and "--load-in-4bit" in texts and "combined" in texts


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="value_head"):
        estimate_ppo_memory(REFERENCE_CONFIGS["qwen2.5-7b"], **REF, value_head="both")
    with pytest.raises(ValueError, match="LoRA target"):
        estimate_ppo_memory(REFERENCE_CONFIGS["qwen2.5-7b"], **REF, lora_target=["c_attn"])


def test_plan_main_reference_shape(capsys):
    assert plan_main(["--model", "qwen2.5-7b", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "peak:" in out and "KV cache" in out and "chunks of 512" in out
    assert "per_device_train_batch_size=4, num_mini_batches=2" in out  # the recommended 8 = 4 x 2
    assert plan_main(["--model", "qwen2.5-7b", "--logprob-chunk-size", "0", "--kbit-upcast", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "full logits" in out and "fp32 upcast" in out and "CUDA context" not in out


def test_recommended_config_fits_consumer_gpus():
    """Issue 13's targets with the `trl-gae plan` defaults (batch 8 = micro 4 x 2, prompt 256 + response 512, adapter
    critic, chunked log-probs, no fp32 upcast, checkpointing): 7B <= 12 GiB, 14B <= 20 GiB; 32B fits 24 GiB with the
    combination the suggestions name."""
    args = build_plan_parser().parse_args(["--model", "x"])
    kwargs = {key: getattr(args, key) for key in planner._PLAN_ARGS} | {"logprob_chunk_size": args.logprob_chunk_size}
    assert estimate_ppo_memory("qwen2.5-7b", **kwargs).peak <= 12 * GIB
    assert estimate_ppo_memory("qwen2.5-14b", **kwargs).peak <= 20 * GIB
    big = estimate_ppo_memory("qwen2.5-32b", **kwargs)
    assert not big.fits(24)
    combined = big.suggestions(24)[-1]
    assert combined.startswith("combined:") and "(fits)" in combined
    assert estimate_ppo_memory(
        "qwen2.5-32b", **{**kwargs, "micro_batch_size": 1, "rollout_forward_batch_size": 4, "lora_r": 4,
                          "optimizer": "adamw_8bit"}
    ).fits(24)  # fmt: skip


def test_each_saving_lowers_the_peak():
    today = dict(kbit_upcast=True, logprob_chunk_size=None)
    steps = [today, {**today, "logprob_chunk_size": 512}, {"logprob_chunk_size": 512, "kbit_upcast": False}]
    peaks = [_peak(**kw) for kw in steps]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 3
    texts = " ".join(estimate_ppo_memory("qwen2.5-14b", **REF, **today).suggestions(24))
    assert "logprob_chunk_size=512" in texts and "--no-kbit-upcast" in texts


def test_plan_main_local_config(tmp_path, capsys):
    config = CONFIG_TABLE["qwen2-untied"]
    config.save_pretrained(tmp_path)  # writes config.json only
    assert plan_main(["--model", str(tmp_path / "config.json"), "--gpu-memory", "1"]) == 0
    assert plan_main(["--model", str(tmp_path), "--value-head", "all", "--no-load-in-4bit"]) == 0
    out = capsys.readouterr().out
    assert "qwen2" in out and "value-head layouts:" in out and "separate" in out


@pytest.mark.parametrize("model", ["no-such-org/no-such-model", "/no/such/dir/config.json"])
def test_plan_main_unknown_model(model, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast instead of waiting on hub retries
    assert plan_main(["--model", model]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and model in err and "error" in err


def test_hub_alias_falls_back_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan_main(["--model", "Qwen/Qwen2.5-7B-Instruct"]) == 0
    assert "built-in 'qwen2.5-7b'" in capsys.readouterr().out


def test_report_numbers_are_consistent():
    est = estimate_ppo_memory("qwen2.5-7b", **REF)
    data = json.loads(json.dumps(est.to_dict()))
    parts = ("base_weights", "adapters", "reference_adapter", "value_head", "optimizer_states", "dequant_workspace")
    static = sum(data[p] for p in parts)
    # one graph's bf16 checkpoints (no fp32 upcast by default): L * 2H bytes per token, micro batch 8 of 768 tokens
    assert data["policy_activations"] == 28 * 2 * 3584 * 8 * 768
    training = static + max(data["training_moments"].values())
    assert est.phases["training"] == training + planner._overhead(training)
    assert data["training_peak_at"] == max(data["training_moments"], key=data["training_moments"].get)
    assert est.peak == max(est.phases.values()) and est.peak == est.peak_allocated + est.cuda_overhead
    assert f"{est.peak / GIB:.2f} GiB" in est.format_report(24)


@pytest.mark.parametrize("kl_coef", [0.05, 0.0])
def test_adapters_match_the_trainers_model(tokenizer, tmp_path, kl_coef):
    """The planner's adapter bytes are those of the LoRA weights `PPOTrainer` creates: policy and critic adapters
    (trained) and, with a KL term, the frozen `ref` copy of the policy adapter (weights only: no gradient, no optimizer
    state)."""
    from conftest import offline_args
    from datasets import Dataset
    from peft import LoraConfig

    from trl_gae_ext import PPOTrainer
    from trl_gae_ext.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = offline_args(tmp_path, value_head="adapter", kl_coef=kl_coef, per_device_train_batch_size=2)
    trainer = PPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["alpha"] * 2}), processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    lora_params = [(n, p) for n, p in trainer.model.named_parameters() if "lora_" in n]
    trained = sum(p.numel() * p.element_size() for _, p in lora_params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for _, p in lora_params if not p.requires_grad)
    assert (frozen > 0) == (kl_coef > 0)  # the trainer made the `ref` adapter only for the KL term
    est = estimate_ppo_memory(model.config, batch_size=2, prompt_length=4, response_length=4, lora_r=4,
                              load_in_4bit=False, dtype="float32", reference_adapter=kl_coef > 0)  # fmt: skip
    assert est.adapters == trained and est.reference_adapter == frozen
    head = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) - trained // 4
    assert est.trainable_parameters == trained // 4 + head  # optimizer states and gradients: trained weights only
    static = est.base_weights + est.adapters + est.reference_adapter + est.value_head + est.optimizer_states
    assert est.phases_allocated["scoring"] == static + est.dequant_workspace + est.scoring_workspace
