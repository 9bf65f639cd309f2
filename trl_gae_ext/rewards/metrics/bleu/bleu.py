"""BLEU on sacrebleu, loadable offline with `evaluate.load(<path to this directory>)`.

Part of `trl_gae_ext`; `trl_gae_ext.rewards.load_metric("bleu")` falls back to it when the Hugging Face Hub is
unreachable. Same input format and result keys as the Hub's `bleu` module, but computed by sacrebleu (see
`_KWARGS_DESCRIPTION` for the differences).
"""

import datasets
import evaluate

from trl_gae_ext.rewards.text_metrics import BleuReward, resolve_bleu_tokenize, unit_score


_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
    year = "2002",
    pages = "311--318",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
BLEU (Papineni et al., 2002) computed with sacrebleu, in [0, 1]. Corpus BLEU by default; per-sample sentence BLEU
with `use_aggregator=False`, equal to `sacrebleu.sentence_bleu(prediction, references).score / 100` (a perfect
match is 1.0, not 1.0000000000000004).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of references, each a string or a list of strings (several references per prediction).
    tokenize: sacrebleu tokenizer ("13a", "zh", "intl", "char", "none", ...) or "auto" (default): "zh" when a text
        holds Chinese/Japanese/Korean characters, else "13a" (decided per sample with use_aggregator=False, over
        the whole corpus otherwise).
    smooth_method: "exp" (default), "floor", "add-k" or "none". smooth_value: for "floor"/"add-k".
    lowercase: lowercase before scoring (default False).
    use_effective_order: ignore n-gram orders with no possible match (default True, as sacrebleu.sentence_bleu;
        for corpora it only matters when every prediction is shorter than max_order).
    max_order: highest n-gram order (default 4).
    use_aggregator: True (default) for one corpus score; False for lists with one value per prediction.
Returns:
    bleu: BLEU in [0, 1]; precisions: n-gram precisions in [0, 1]; brevity_penalty; length_ratio;
    translation_length; reference_length. With use_aggregator=False, each is a list over predictions.
Differences from the Hub's `bleu`: sacrebleu's tokenizers instead of a `tokenizer` callable, sacrebleu's smoothing
methods instead of `smooth=True/False`, and the closest (not the shortest) reference length for the brevity penalty.
Examples:
    >>> bleu = evaluate.load(path_to_this_directory)
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["bleu"]
    1.0
"""


def _as_lists(references):
    return [[ref] if isinstance(ref, str) else list(ref) for ref in references]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(
        self,
        predictions,
        references,
        tokenize="auto",
        smooth_method="exp",
        smooth_value=None,
        lowercase=False,
        use_effective_order=True,
        max_order=4,
        use_aggregator=True,
    ):
        references = _as_lists(references)
        scorer = BleuReward(
            tokenize=tokenize,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            lowercase=lowercase,
            use_effective_order=use_effective_order,
            max_ngram_order=max_order,
        )
        if use_aggregator:
            texts = [*predictions, *(ref for refs in references for ref in refs)]
            metric = scorer.metric(resolve_bleu_tokenize(tokenize, texts))
            # sacrebleu wants one stream per reference position; None pads rows with fewer references.
            width = max((len(refs) for refs in references), default=0)
            streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
            return _result(metric.corpus_score(predictions, streams))
        scores = [_result(scorer.sentence_score(p, refs)) for p, refs in zip(predictions, references)]
        return {key: [score[key] for score in scores] for key in _KEYS}


_KEYS = ("bleu", "precisions", "brevity_penalty", "length_ratio", "translation_length", "reference_length")


def _result(score):
    return {
        "bleu": unit_score(score.score),
        "precisions": [p / 100.0 for p in score.precisions],
        "brevity_penalty": score.bp,
        "length_ratio": score.ratio,
        "translation_length": score.sys_len,
        "reference_length": score.ref_len,
    }
