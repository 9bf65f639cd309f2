"""ROUGE on rouge_score, with CJK support, loadable offline with `evaluate.load(<path to this directory>)`.

Part of `trl_gae_ext`; `trl_gae_ext.rewards.load_metric("rouge")` falls back to it when the Hugging Face Hub is
unreachable. Same inputs and result keys as the Hub's `rouge` module (see `_KWARGS_DESCRIPTION` for the
differences).
"""

import datasets
import evaluate

from trl_gae_ext.rewards.text_metrics import best_rouge_scores, build_rouge_scorer, check_rouge_type


_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Lin, 2004) computed with Google's rouge_score, in [0, 1]. Chinese, Japanese and Korean characters are
tokens of their own (rouge_score's tokenizer deletes them, so such text would always score 0); other text is
tokenized exactly as rouge_score does, so English scores equal rouge_score's.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of references, each a string or a list of strings (the best reference by F-measure counts).
    rouge_types: list of "rouge1".."rouge9", "rougeL", "rougeLsum" (default ["rouge1", "rouge2", "rougeL",
        "rougeLsum"]).
    use_aggregator: True (default) for the mean over predictions; False for one value per prediction.
    use_stemmer: Porter-stem words longer than 3 characters (default False).
    tokenizer: optional callable text -> tokens replacing the tokenizer (as in the Hub's rouge).
    cjk: make each CJK character a token (default True; False is rouge_score's own tokenizer).
    measure: "f" (default), "p" or "r".
Returns:
    One key per rouge type: a float (use_aggregator=True) or a list of floats.
Differences from the Hub's `rouge`: CJK text is scored (cjk=True), `measure` can pick precision or recall, and the
aggregate is the plain mean, not the median of a bootstrap resampling (deterministic).
Examples:
    >>> rouge = evaluate.load(path_to_this_directory)
    >>> rouge.compute(predictions=["hello there"], references=["hello there"], rouge_types=["rougeL"])
    {'rougeL': 1.0}
"""

_MEASURES = {"f": "fmeasure", "p": "precision", "r": "recall"}


class _CallableTokenizer:
    def __init__(self, tokenize):
        self.tokenize = tokenize


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self,
        predictions,
        references,
        rouge_types=None,
        use_aggregator=True,
        use_stemmer=False,
        tokenizer=None,
        cjk=True,
        measure="f",
    ):
        rouge_types = [check_rouge_type(t) for t in (rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])]
        if measure not in _MEASURES:
            raise ValueError(f"Invalid measure {measure!r}; valid: 'f', 'p', 'r'.")
        scorer = build_rouge_scorer(rouge_types, use_stemmer=use_stemmer, cjk=cjk)
        if tokenizer is not None:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(rouge_types, tokenizer=_CallableTokenizer(tokenizer))
        field = _MEASURES[measure]
        per_sample = {t: [] for t in rouge_types}
        for prediction, refs in zip(predictions, references):
            scores = best_rouge_scores(scorer, prediction, [refs] if isinstance(refs, str) else list(refs))
            for t in rouge_types:
                per_sample[t].append(getattr(scores[t], field))
        if use_aggregator:
            return {t: (sum(values) / len(values) if values else 0.0) for t, values in per_sample.items()}
        return per_sample
