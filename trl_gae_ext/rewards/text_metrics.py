"""Text-metric rewards: BLEU, ROUGE, chrF (on sacrebleu / rouge_score), exact match and SQuAD token F1.

Each class instance is a TRL reward function (see `base.ReferenceReward`). Scores are per sample, in [0, 1], and
equal the reference libraries' sentence-level scores for the same options:

- `BleuReward`:  `sacrebleu.sentence_bleu(c, refs, ...).score / 100` (all references used together; a perfect
  match is 1.0, not sacrebleu's 100.00000000000004 / 100);
- `RougeReward`: `rouge_score.rouge_scorer.RougeScorer([t]).score_multi(refs, c)[t]` for text without CJK
  characters (the reference with the best F-measure counts, as in `score_multi`);
- `ChrFReward`:  `sacrebleu.sentence_chrf(c, refs, ...).score / 100`.

The sacrebleu metric objects and the `RougeScorer` are built once per reward and reused (building them is most of
the cost of `sacrebleu.sentence_bleu`), and sacrebleu / rouge_score are imported on first use.
"""

from __future__ import annotations

import re
from collections import Counter

from .base import ReferenceReward
from .tokenize import CJKRougeTokenizer, answer_tokens, has_cjk


def unit_score(score: float) -> float:
    """A sacrebleu score (0-100) on [0, 1]. The clip only removes float rounding: sacrebleu returns
    100.00000000000004 for a perfect BLEU (`exp(log(100))`), and a reward documented on [0, 1] should stay there."""
    return min(max(score / 100.0, 0.0), 1.0)


# -- BLEU ---------------------------------------------------------------------------------------------------------
def resolve_bleu_tokenize(tokenize: str, texts) -> str:
    """`"auto"` -> sacrebleu's `zh` tokenizer if any of `texts` holds a CJK character, else `13a`."""
    if tokenize != "auto":
        return tokenize
    return "zh" if has_cjk(*texts) else "13a"


def build_bleu(tokenize: str, **options):
    """A `sacrebleu.BLEU` configured as `sacrebleu.sentence_bleu` configures it."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, force=False, **options)


class BleuReward(ReferenceReward):
    """Sentence BLEU in [0, 1]: `sacrebleu.sentence_bleu(completion, references, ...).score / 100` (clipped to
    [0, 1] against float rounding, see `unit_score`).

    Args:
        tokenize: a sacrebleu tokenizer (`"13a"`, `"zh"`, `"intl"`, `"char"`, `"none"`, ...) or `"auto"` (default):
            `zh` when the completion or a reference holds a CJK character, else `13a`.
        smooth_method, smooth_value, lowercase, use_effective_order: as in `sacrebleu.sentence_bleu` (defaults
            `"exp"`, `None`, `False`, `True`).
        max_ngram_order: highest n-gram order (sacrebleu's `max_ngram_order`, 4).
        reference_column: dataset column with the reference (a string or a list of strings).
        name: the reward's `__name__` (default `"bleu"`).
    """

    default_name = "bleu"

    def __init__(
        self,
        tokenize: str = "auto",
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        lowercase: bool = False,
        use_effective_order: bool = True,
        max_ngram_order: int = 4,
        reference_column: str = "reference",
        name: str | None = None,
    ):
        super().__init__(reference_column, name)
        self.tokenize = tokenize
        self.options = {
            "smooth_method": smooth_method,
            "smooth_value": smooth_value,
            "lowercase": lowercase,
            "effective_order": use_effective_order,
            "max_ngram_order": max_ngram_order,
        }
        self._lazy_metrics = None
        # Fail now, not in the middle of training, on a bad option or a tokenizer whose backend is missing.
        for tok in ("13a", "zh") if tokenize == "auto" else (tokenize,):
            self.metric(tok)

    def metric(self, tokenize: str):
        """The cached `sacrebleu.BLEU` for one tokenizer."""
        if self._lazy_metrics is None:
            self._lazy_metrics = {}
        if tokenize not in self._lazy_metrics:
            self._lazy_metrics[tokenize] = build_bleu(tokenize, **self.options)
        return self._lazy_metrics[tokenize]

    def sentence_score(self, completion: str, references: list[str]):
        """The full `sacrebleu` `BLEUScore` (precisions, brevity penalty, ...) of one pair."""
        tokenize = resolve_bleu_tokenize(self.tokenize, [completion, *references])
        return self.metric(tokenize).sentence_score(completion, references)

    def score(self, completion: str, references: list[str]) -> float:
        return unit_score(self.sentence_score(completion, references).score)

    def _repr_args(self) -> dict:
        return {"tokenize": self.tokenize, **self.options}


# -- ROUGE --------------------------------------------------------------------------------------------------------
_ROUGE_TYPE_RE = re.compile(r"rouge[1-9]|rougeL|rougeLsum")
_MEASURES = {"f": "fmeasure", "p": "precision", "r": "recall"}


def check_rouge_type(rouge_type: str) -> str:
    if not isinstance(rouge_type, str) or not _ROUGE_TYPE_RE.fullmatch(rouge_type):
        raise ValueError(f"Invalid rouge_type {rouge_type!r}; valid: 'rouge1'...'rouge9', 'rougeL', 'rougeLsum'.")
    return rouge_type


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison & Dix 1986; Hyyro 2004): one big-integer step per token of `b` instead of rouge_score's
    `len(a) * len(b)` Python-level table. The result is the same integer, so ROUGE-L scores are identical.
    """
    if len(a) < len(b):
        a, b = b, a
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def lcs_score(target_tokens: list[str], prediction_tokens: list[str]):
    """rouge_score's `_score_lcs` (same formulas, same `Score`), on `lcs_length`."""
    from rouge_score import scoring

    if not target_tokens or not prediction_tokens:
        return scoring.Score(precision=0, recall=0, fmeasure=0)
    lcs = lcs_length(target_tokens, prediction_tokens)
    precision = lcs / len(prediction_tokens)
    recall = lcs / len(target_tokens)
    return scoring.Score(precision=precision, recall=recall, fmeasure=scoring.fmeasure(precision, recall))


class RougeScorer:
    """`rouge_score.rouge_scorer.RougeScorer` with the same `score`/`score_multi` results, faster for `rougeL`.

    `rougeL` goes through `lcs_score`; the other types through a `RougeScorer` sharing the tokenizer.
    """

    def __init__(self, rouge_types, use_stemmer: bool = False, cjk: bool = True, split_summaries: bool = False):
        from rouge_score import rouge_scorer, tokenizers

        self.rouge_types = [check_rouge_type(t) for t in rouge_types]
        self.tokenizer = CJKRougeTokenizer(use_stemmer) if cjk else tokenizers.DefaultTokenizer(use_stemmer)
        others = [t for t in self.rouge_types if t != "rougeL"]
        self._others = (
            rouge_scorer.RougeScorer(others, split_summaries=split_summaries, tokenizer=self.tokenizer)
            if others
            else None
        )

    def score(self, target: str, prediction: str) -> dict:
        result = self._others.score(target, prediction) if self._others is not None else {}
        if "rougeL" in self.rouge_types:
            tokenize = self.tokenizer.tokenize
            result["rougeL"] = lcs_score(tokenize(target), tokenize(prediction))
        return {t: result[t] for t in self.rouge_types}

    def score_multi(self, targets: list[str], prediction: str) -> dict:
        """Per rouge type, the target with the best F-measure (the first one on ties), as rouge_score does."""
        score_dicts = [self.score(t, prediction) for t in targets]
        best = {}
        for t in self.rouge_types:
            index = max(range(len(score_dicts)), key=lambda i: score_dicts[i][t].fmeasure)
            best[t] = score_dicts[index][t]
        return best


def build_rouge_scorer(rouge_types, use_stemmer: bool = False, cjk: bool = True, split_summaries: bool = False):
    """A scorer with `rouge_score`'s results; with `cjk`, tokenized by `CJKRougeTokenizer` (CJK chars as tokens)."""
    return RougeScorer(rouge_types, use_stemmer=use_stemmer, cjk=cjk, split_summaries=split_summaries)


def best_rouge_scores(scorer, prediction: str, references: list[str]) -> dict:
    """`{rouge_type: Score}`; with several references, the one with the best F-measure (`score_multi`)."""
    if len(references) == 1:
        return scorer.score(references[0], prediction)
    return scorer.score_multi(references, prediction)


class RougeReward(ReferenceReward):
    """ROUGE in [0, 1], equal to `rouge_score` on text without CJK characters.

    Args:
        rouge_type: `"rougeL"` (default), `"rouge1"`, `"rouge2"` (any `"rougeN"`, N in 1..9) or `"rougeLsum"`
            (summary-level LCS over newline-separated sentences).
        measure: `"f"` (F-measure, default), `"p"` (precision) or `"r"` (recall). With several references the
            reference with the best F-measure counts, as in `RougeScorer.score_multi`, and `measure` is read from it.
        use_stemmer: Porter-stem words longer than 3 characters (as `rouge_score`).
        cjk: make each Chinese/Japanese/Korean character a token (default). `rouge_score`'s own tokenizer deletes
            non-ASCII text, so Chinese would always score 0; `cjk=False` gives that behaviour back.
        split_summaries: for `rougeLsum`, split sentences with nltk instead of on newlines.
        reference_column, name: as for every reward (`name` defaults to `rouge_type`, plus `_p`/`_r` for
            precision/recall).
    """

    def __init__(
        self,
        rouge_type: str = "rougeL",
        measure: str = "f",
        use_stemmer: bool = False,
        cjk: bool = True,
        split_summaries: bool = False,
        reference_column: str = "reference",
        name: str | None = None,
    ):
        self.rouge_type = check_rouge_type(rouge_type)
        measure = {"fmeasure": "f", "precision": "p", "recall": "r"}.get(measure, measure)
        if measure not in _MEASURES:
            raise ValueError(f"Invalid measure {measure!r}; valid: 'f', 'p', 'r'.")
        self.measure = measure
        self.use_stemmer = use_stemmer
        self.cjk = cjk
        self.split_summaries = split_summaries
        self._lazy_scorer = None
        default = rouge_type if measure == "f" else f"{rouge_type}_{measure}"
        super().__init__(reference_column, name or default)

    @property
    def scorer(self):
        if self._lazy_scorer is None:
            self._lazy_scorer = build_rouge_scorer([self.rouge_type], self.use_stemmer, self.cjk, self.split_summaries)
        return self._lazy_scorer

    def score(self, completion: str, references: list[str]) -> float:
        result = best_rouge_scores(self.scorer, completion, references)[self.rouge_type]
        return getattr(result, _MEASURES[self.measure])

    def _repr_args(self) -> dict:
        return {
            "rouge_type": self.rouge_type,
            "measure": self.measure,
            "use_stemmer": self.use_stemmer,
            "cjk": self.cjk,
        }


# -- chrF ---------------------------------------------------------------------------------------------------------
def build_chrf(**options):
    from sacrebleu.metrics import CHRF

    return CHRF(**options)


class ChrFReward(ReferenceReward):
    """Sentence chrF (`word_order=0`) or chrF++ (`word_order=2`) in [0, 1]:
    `sacrebleu.sentence_chrf(completion, references, ...).score / 100`.

    Args:
        char_order, word_order, beta, lowercase, eps_smoothing: as in sacrebleu's `CHRF` (6, 0, 2, False, False).
        whitespace: keep whitespace in character n-grams (sacrebleu's `whitespace`, the opposite of
            `sentence_chrf`'s `remove_whitespace`).
        reference_column, name: as for every reward (`name` defaults to `"chrf"`, `"chrf++"` for `word_order=2`).
    """

    def __init__(
        self,
        char_order: int = 6,
        word_order: int = 0,
        beta: int = 2,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
        reference_column: str = "reference",
        name: str | None = None,
    ):
        super().__init__(reference_column, name or "chrf" + "+" * word_order)
        self.options = {
            "char_order": char_order,
            "word_order": word_order,
            "beta": beta,
            "lowercase": lowercase,
            "whitespace": whitespace,
            "eps_smoothing": eps_smoothing,
        }
        self._lazy_metric = build_chrf(**self.options)  # validates the options now

    @property
    def metric(self):
        if self._lazy_metric is None:
            self._lazy_metric = build_chrf(**self.options)
        return self._lazy_metric

    def score(self, completion: str, references: list[str]) -> float:
        return unit_score(self.metric.sentence_score(completion, references).score)

    def _repr_args(self) -> dict:
        return dict(self.options)


# -- QA: exact match and SQuAD token F1 ---------------------------------------------------------------------------
class ExactMatchReward(ReferenceReward):
    """1.0 if the completion matches any reference, else 0.0.

    Args:
        normalize: compare SQuAD-normalized answers (lowercase, no punctuation, no articles, collapsed whitespace;
            default). With `normalize=False` the strings are compared exactly, after stripping surrounding
            whitespace.
        cjk: with `normalize`, also drop ideographic/fullwidth punctuation and ignore spacing between CJK
            characters (default; no effect on text without CJK characters).
        reference_column, name: as for every reward (`name` defaults to `"exact_match"`).
    """

    default_name = "exact_match"

    def __init__(self, normalize: bool = True, cjk: bool = True, reference_column: str = "reference", name=None):
        super().__init__(reference_column, name)
        self.normalize = normalize
        self.cjk = cjk

    def _key(self, text: str):
        return answer_tokens(text, self.cjk) if self.normalize else text.strip()

    def score(self, completion: str, references: list[str]) -> float:
        key = self._key(completion)
        return float(any(key == self._key(ref) for ref in references))

    def _repr_args(self) -> dict:
        return {"normalize": self.normalize, "cjk": self.cjk}


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    """SQuAD v2.0's `compute_f1` on token lists (1.0 if both are empty, 0.0 if only one is)."""
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    num_same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


class TokenF1Reward(ReferenceReward):
    """SQuAD-style token F1 in [0, 1] (bag of normalized words; the best reference counts).

    Args:
        cjk: each CJK character is a token and ideographic punctuation is dropped (default; text without CJK
            characters is tokenized exactly as SQuAD's evaluation script does).
        reference_column, name: as for every reward (`name` defaults to `"token_f1"`).
    """

    default_name = "token_f1"

    def __init__(self, cjk: bool = True, reference_column: str = "reference", name: str | None = None):
        super().__init__(reference_column, name)
        self.cjk = cjk

    def score(self, completion: str, references: list[str]) -> float:
        prediction = answer_tokens(completion, self.cjk)
        return max(token_f1(prediction, answer_tokens(ref, self.cjk)) for ref in references)

    def _repr_args(self) -> dict:
        return {"cjk": self.cjk}
