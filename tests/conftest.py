"""Shared fixtures: a word-level tokenizer trained in-process and tiny Llama models built from configs."""

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
CORPUS = [" ".join(WORDS), "say a word : alpha", "repeat after me : beta gamma", "the reference text"]


@pytest.fixture(scope="session")
def tokenizer():
    from trl_gae_ext.tiny import build_tokenizer

    return build_tokenizer(CORPUS)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny causal LM and its tokenizer saved to disk, so it can be loaded by path like a hub model."""
    from trl_gae_ext.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def offline_args(tmp_path, **fields):
    """`PPOConfig` for a test run: offline, on the CPU, no checkpoints, no progress bar, seed 0; `fields` set the rest
    (and may override these)."""
    from trl_gae_ext import PPOConfig

    base = dict(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0
    )
    return PPOConfig(**{**base, **fields})


def make_prompts(n: int, conversational: bool = False):
    prompts = [f"say a word : {WORDS[i % len(WORDS)]}" for i in range(n)]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return prompts


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
