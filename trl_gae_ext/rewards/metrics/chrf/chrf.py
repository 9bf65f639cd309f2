"""chrF and chrF++ on sacrebleu, loadable offline with `evaluate.load(<path to this directory>)`.

Part of `trl_gae_ext`; `trl_gae_ext.rewards.load_metric("chrf")` falls back to it when the Hugging Face Hub is
unreachable. Same inputs and result keys as the Hub's `chrf` module (scores on sacrebleu's 0-100 scale), plus
`use_aggregator=False` for per-sample scores.
"""

import datasets
import evaluate

from trl_gae_ext.rewards.text_metrics import build_chrf


_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
    title = "chr{F}++: words helping character n-grams",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Second Conference on Machine Translation",
    year = "2017",
    pages = "612--618",
}
"""

_DESCRIPTION = """\
chrF (Popovic, 2015) and chrF++ (word_order=2; Popovic, 2017) computed with sacrebleu, on a 0-100 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of references, each a string or a list of strings.
    char_order: character n-gram order (default 6). word_order: word n-gram order (default 0; 2 is chrF++).
    beta: recall weight (default 2). lowercase: default False. whitespace: keep whitespace in character n-grams
        (default False). eps_smoothing: sacreBLEU/chrF++.py-style epsilon smoothing (default False).
    use_aggregator: True (default) for the corpus score; False for one score per prediction, each equal to
        sacrebleu.sentence_chrf(prediction, references).score.
Returns:
    score: chrF on 0-100 (a float, or a list with use_aggregator=False); char_order; word_order; beta.
Examples:
    >>> chrf = evaluate.load(path_to_this_directory)
    >>> chrf.compute(predictions=["the cat sat"], references=[["the cat sat"]])["score"]
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):  # evaluate names the module after the class: "chrf"
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
        char_order=6,
        word_order=0,
        beta=2,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
        use_aggregator=True,
    ):
        metric = build_chrf(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if use_aggregator:
            width = max((len(refs) for refs in references), default=0)
            streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
            score = metric.corpus_score(predictions, streams).score
        else:
            score = [metric.sentence_score(p, refs).score for p, refs in zip(predictions, references)]
        return {"score": score, "char_order": char_order, "word_order": word_order, "beta": beta}
