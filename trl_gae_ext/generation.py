"""Rollout and evaluation generation from `PPOConfig` alone.

`generate` fills every option a `GenerationConfig` leaves unset from the model's own `generation_config` (the
checkpoint's `generation_config.json`: `min_p`, `typical_p`, `no_repeat_ngram_size`, `repetition_penalty`,
`min_new_tokens`, beam search, ...; transformers' `_prepare_generation_config`), and only then from its neutral
global defaults. PPO scores the sampled tokens under the temperature-scaled model distribution (docs/ppo.md, items
4 and 7), so a processor it did not ask for means the responses come from a distribution PPO does not score. TRL
1.12's PPO trainer likewise sampled with its own settings only.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from transformers import GenerationConfig

from .config import PPOConfig
from .modeling import is_peft_model


def build_generation_config(args: PPOConfig, tokenizer, stop_token_id: int | None, sampling: bool) -> GenerationConfig:
    """The generation settings of a rollout (`sampling=True`) or of greedy evaluation: `PPOConfig`'s sampling
    fields, then `generation_kwargs` (which override them), and the tokenizer's special tokens."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.response_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_id,
        do_sample=sampling,
    )
    if sampling:
        kwargs.update(
            temperature=args.temperature,
            top_k=args.top_k or 0,  # transformers' global default would be 50
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
    kwargs.update(args.generation_kwargs or {})
    return GenerationConfig(**kwargs)


@contextlib.contextmanager
def generating_with(model: nn.Module, config: GenerationConfig):
    """Make `config` the model's own generation config for the duration of the block (restored after it).

    `generate(generation_config=config)` then merges `config` with itself, so an option `config` leaves unset (None)
    takes transformers' neutral global default rather than the checkpoint's value: only what `config` says applies.
    A `PeftModel` generates with its base model's generation config, which is the one swapped.
    """
    owner = model.get_base_model() if is_peft_model(model) else model
    saved = owner.generation_config
    owner.generation_config = config
    try:
        yield
    finally:
        owner.generation_config = saved
