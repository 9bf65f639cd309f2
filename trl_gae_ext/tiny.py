"""Tiny models and tokenizers built in-process, for the offline demo, the tests and the benchmarks.

Nothing here touches a hub: the tokenizer is a word-level vocabulary trained with `tokenizers` on a corpus the
caller gives, and the model is a Llama-style causal LM built from a config with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable


SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# A minimal chat template so conversational prompts work with TRL's `apply_chat_template` helpers.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {{ '<eos>' }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer(corpus: Iterable[str], extra_tokens: Iterable[str] = ()):
    """Train a whitespace word-level tokenizer (digits split one per token) on `corpus`.

    Returns a `transformers.PreTrainedTokenizerFast` with pad/eos/bos/unk tokens and a chat template. Decoding
    joins tokens with single spaces, so texts made of space-separated words round-trip exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with one space
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.WordLevelTrainer(special_tokens=specials + list(extra_tokens) + ["user", "assistant", ":"])
    tok.train_from_iterator(list(corpus), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(
    tokenizer,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
    model_class=None,
    **config_kwargs,
):
    """A Llama-style model with random weights sized for CPU tests. `model_class` defaults to
    `AutoModelForCausalLM`; pass `AutoModelForSequenceClassification` (with `num_labels=1`) for a reward model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    model_class = model_class or AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class.from_config(config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
