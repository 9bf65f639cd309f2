"""Tokenization helpers shared by the text-metric rewards and the packaged `evaluate` modules.

- CJK detection (`has_cjk`), which picks sacrebleu's `zh` tokenizer for BLEU when `tokenize="auto"`.
- `CJKRougeTokenizer`: `rouge_score`'s default tokenizer deletes everything outside `[a-z0-9]`, so Chinese,
  Japanese and Korean text tokenizes to nothing and every ROUGE score is 0. This tokenizer makes each CJK
  character a token of its own and tokenizes the rest exactly as `rouge_score` does, so English scores are
  unchanged.
- SQuAD answer normalization for exact match and token F1.

Only the standard library is imported here; `rouge_score` (which pulls in nltk) is imported on first use.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator


# Han ideographs (with extensions and compatibility blocks), kana, Hangul, CJK radicals and the iteration marks
# 々〆〇. Punctuation blocks (U+3000-303F except those marks, fullwidth forms) are not "characters" here: like ASCII
# punctuation they separate tokens.
_CJK_RANGES = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u2e80-\u2eff"  # CJK Radicals Supplement
    "\u2f00-\u2fdf"  # Kangxi Radicals
    "\u3005-\u3007"  # 々 〆 〇
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u3130-\u318f"  # Hangul Compatibility Jamo
    "\u31f0-\u31ff"  # Katakana Phonetic Extensions
    "\u3400-\u4dbf"  # CJK Unified Ideographs Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uac00-\ud7af"  # Hangul Syllables
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\uff66-\uff9f"  # Halfwidth Katakana
    "\U00020000-\U0003134f"  # CJK Unified Ideographs Extensions B-G and Compatibility Supplement
)
CJK_CHAR_RE = re.compile(f"[{_CJK_RANGES}]")
_CJK_SPLIT_RE = re.compile(f"([{_CJK_RANGES}])")

# Ideographic and fullwidth punctuation, dropped by the CJK-aware SQuAD tokenizer as ASCII punctuation is.
_CJK_PUNCT_RE = re.compile("[\u3000-\u3004\u3008-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")


def has_cjk(*texts: str) -> bool:
    """True if any of `texts` holds a Chinese, Japanese or Korean character."""
    return any(CJK_CHAR_RE.search(text) for text in texts)


def split_cjk(text: str) -> Iterator[tuple[bool, str]]:
    """Yield `(is_cjk_char, piece)`: each CJK character alone, the text between them as one piece."""
    for i, piece in enumerate(_CJK_SPLIT_RE.split(text)):
        if piece:
            yield i % 2 == 1, piece


class CJKRougeTokenizer:
    """A `rouge_score` tokenizer (an object with `tokenize(text) -> list[str]`) that keeps CJK characters.

    Each CJK character is one token; the text between CJK characters goes through `rouge_score.tokenize.tokenize`
    (lowercase, non-`[a-z0-9]` to spaces, Porter stemming of words longer than 3 characters when `use_stemmer`).
    On text without CJK characters the output is exactly `rouge_score`'s `DefaultTokenizer(use_stemmer)` output,
    because that tokenizer treats CJK characters as separators anyway.
    """

    def __init__(self, use_stemmer: bool = False):
        self.use_stemmer = use_stemmer
        self._tokenize = None  # rouge_score's tokenize function, bound on first use (not pickled)
        self._stemmer = None

    def _rouge_tokenize(self, text: str) -> list[str]:
        if self._tokenize is None:
            from rouge_score import tokenize as rouge_tokenize

            if self.use_stemmer:
                from nltk.stem import porter

                self._stemmer = porter.PorterStemmer()
            self._tokenize = rouge_tokenize.tokenize
        return self._tokenize(text, self._stemmer)

    def tokenize(self, text: str) -> list[str]:
        if not CJK_CHAR_RE.search(text):
            return self._rouge_tokenize(text)
        tokens: list[str] = []
        for is_cjk, piece in split_cjk(text):
            if is_cjk:
                tokens.append(piece)
            else:
                tokens.extend(self._rouge_tokenize(piece))
        return tokens

    def __getstate__(self):
        return {"use_stemmer": self.use_stemmer, "_tokenize": None, "_stemmer": None}

    def __repr__(self) -> str:
        return f"CJKRougeTokenizer(use_stemmer={self.use_stemmer})"


# SQuAD v1.1/v2.0 official evaluation script: lower, drop punctuation and articles, collapse whitespace.
_PUNCT = set(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD's `normalize_answer`: lowercase, remove punctuation, articles and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str, cjk: bool = True) -> list[str]:
    """SQuAD tokens of an answer (`normalize_answer(text).split()`). With `cjk`, each CJK character is a token and
    ideographic/fullwidth punctuation is dropped (text without CJK characters or such punctuation is unaffected)."""
    normalized = normalize_answer(text)
    if not cjk or normalized.isascii():
        return normalized.split()
    normalized = _CJK_PUNCT_RE.sub(" ", normalized)
    tokens: list[str] = []
    for is_cjk, piece in split_cjk(normalized):
        tokens.extend([piece] if is_cjk else piece.split())
    return tokens
