"""The packaged evaluate modules, `EvaluateReward` and the offline fallback. Real `evaluate`, no Hub."""

import logging
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import evaluate
import pytest
import sacrebleu

from trl_gae_ext.rewards import (
    BleuReward,
    ChrFReward,
    EvaluateReward,
    RougeReward,
    load_metric,
    packaged_metric_path,
)
from trl_gae_ext.rewards import evaluate_reward as evaluate_reward_module


COMPLETIONS = ["the cat sat on the mat", "a quick brown fox", "我爱北京天安门", "hello world", ""]
REFERENCES = ["the cat is on the mat", ["the fast brown fox", "a quick fox"], "我爱北京", None, "x"]


def call(reward, completions=COMPLETIONS, references=REFERENCES):
    return reward(prompts=["p"] * len(completions), completions=completions, reference=references)


@pytest.fixture(params=["HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"])
def offline(request, monkeypatch):
    """Either variable alone sends `bleu`/`rouge`/`chrf` to the packaged modules without touching the network."""
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(request.param, "1")
    monkeypatch.setattr(evaluate_reward_module, "_hub_state", {})
    return request.param


@pytest.mark.parametrize("name", ["bleu", "rouge", "chrf"])
def test_packaged_modules_load_with_evaluate_load(name):
    module = evaluate.load(packaged_metric_path(name))
    assert module.name == name
    result = module.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])
    key = {"bleu": "bleu", "rouge": "rougeL", "chrf": "score"}[name]
    assert result[key] == {"bleu": 1.0, "rouge": 1.0, "chrf": 100.0}[name]


def test_packaged_modules_equal_the_rewards():
    predictions = [c for c, r in zip(COMPLETIONS, REFERENCES) if r is not None]
    references = [r for r in REFERENCES if r is not None]
    as_lists = [[r] if isinstance(r, str) else r for r in references]
    bleu = evaluate.load(packaged_metric_path("bleu"))
    per_sample = bleu.compute(predictions=predictions, references=as_lists, use_aggregator=False)["bleu"]
    assert per_sample == [BleuReward().score(p, refs) if p else 0.0 for p, refs in zip(predictions, as_lists)]
    corpus = bleu.compute(predictions=predictions[:2], references=as_lists[:2])
    expected = sacrebleu.corpus_bleu(predictions[:2], [[r[0] for r in as_lists[:2]], [None, as_lists[1][1]]])
    assert corpus["bleu"] == pytest.approx(expected.score / 100)
    assert corpus["translation_length"] == expected.sys_len

    rouge = evaluate.load(packaged_metric_path("rouge"))
    result = rouge.compute(predictions=predictions, references=as_lists, rouge_types=["rouge2", "rougeL"])
    per_sample = rouge.compute(predictions=predictions, references=as_lists, use_aggregator=False)
    for rouge_type in ("rouge2", "rougeL"):
        expected = [RougeReward(rouge_type).score(p, refs) for p, refs in zip(predictions, as_lists)]
        assert per_sample[rouge_type] == expected
        assert result[rouge_type] == pytest.approx(sum(expected) / len(expected))
    assert per_sample["rougeL"][2] > 0  # Chinese is scored

    chrf = evaluate.load(packaged_metric_path("chrf"))
    scores = chrf.compute(predictions=predictions, references=as_lists, word_order=2, use_aggregator=False)["score"]
    assert [s / 100 for s in scores] == [ChrFReward(word_order=2).score(p, r) for p, r in zip(predictions, as_lists)]


def test_evaluate_reward_on_packaged_modules_offline(offline, caplog):
    with caplog.at_level(logging.INFO, logger=evaluate_reward_module.__name__):
        rouge = EvaluateReward("rouge")
        bleu = EvaluateReward("bleu")
        assert rouge.__name__ == "evaluate_rouge" and bleu.__name__ == "evaluate_bleu"
        rouge_values, bleu_values = call(rouge), call(bleu)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{offline} is set" in warnings[0].getMessage()
    assert "packaged offline 'rouge' module" in warnings[0].getMessage()
    # rouge takes use_aggregator, so one batched call scored the batch; results equal the direct rewards
    assert rouge._batched is True and bleu._batched is True
    assert rouge_values == call(RougeReward("rougeL"))
    assert bleu_values == call(BleuReward())
    assert rouge_values[3] is None and rouge_values[4] == 0.0


def test_evaluate_reward_score_key_and_compute_kwargs(offline):
    reward = EvaluateReward("rouge", score_key="rouge1", use_stemmer=True)
    assert reward.__name__ == "evaluate_rouge_rouge1"
    assert call(reward) == call(RougeReward("rouge1", use_stemmer=True))
    with pytest.raises(KeyError, match="score_key 'nope' not in the result keys"):
        call(EvaluateReward("rouge", score_key="nope"))
    chrf = EvaluateReward(packaged_metric_path("chrf"))  # a local path; chrF is on 0-100
    assert chrf.__name__ == "evaluate_chrf"
    assert call(chrf) == [None if v is None else 100 * v for v in call(ChrFReward())]


WORD_OVERLAP_MODULE = '''
import datasets
import evaluate


class WordOverlap(evaluate.Metric):
    """Fraction of reference words found in the prediction; a corpus mean unless use_aggregator=False."""

    def _info(self):
        return evaluate.MetricInfo(
            description="word overlap",
            citation="",
            inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, use_aggregator=True, lowercase=False):
        scores = []
        for prediction, reference in zip(predictions, references):
            if lowercase:
                prediction, reference = prediction.lower(), reference.lower()
            words = reference.split()
            scores.append(sum(w in prediction.split() for w in words) / len(words))
        return {"word_overlap": sum(scores) / len(scores) if use_aggregator else scores, "n": len(scores)}
'''


@pytest.fixture
def word_overlap_path(tmp_path):
    directory = tmp_path / "word_overlap"
    directory.mkdir()
    (directory / "word_overlap.py").write_text(WORD_OVERLAP_MODULE)
    return str(directory)


def test_evaluate_reward_on_a_local_module(word_overlap_path):
    completions = ["The cat sat", "a dog", "cat", ""]
    references = ["the cat", "a big dog", "cat", "x"]
    # "the cat" in "the cat sat": 1 of 2 words (case-sensitive); "a big dog" in "a dog": 2 of 3; "cat": 1 of 1.
    expected = [0.5, 2 / 3, 1.0, 0.0]
    batched = EvaluateReward(word_overlap_path)
    assert batched.__name__ == "evaluate_word_overlap"
    assert call(batched, completions, references) == pytest.approx(expected)
    assert batched._batched is True  # use_aggregator=False was passed automatically: one call per batch

    # With the aggregate forced, the module returns one number per batch: the reward scores sample by sample.
    per_sample = EvaluateReward(word_overlap_path, use_aggregator=True, lowercase=True)
    assert call(per_sample, completions, references) == pytest.approx([1.0, 2 / 3, 1.0, 0.0])
    assert per_sample._batched is False

    loaded = evaluate.load(word_overlap_path)  # an already-loaded module
    reward = EvaluateReward(loaded, name="overlap")
    assert reward.__name__ == "overlap" and call(reward, completions, references) == pytest.approx(expected)


def test_evaluate_reward_pickles(word_overlap_path, offline):
    references = ["the cat", "a fox", "我爱北京", None, "x"]  # word_overlap takes one reference string per sample
    for reward in (EvaluateReward("rouge"), EvaluateReward(word_overlap_path)):
        before = call(reward, COMPLETIONS, references)
        clone = pickle.loads(pickle.dumps(reward))
        assert clone._lazy_module is None and clone.__name__ == reward.__name__
        assert call(clone, COMPLETIONS, references) == before


def test_evaluate_reward_needs_a_score_key_when_ambiguous(tmp_path):
    path = tmp_path / "two_scores.py"
    path.write_text(
        WORD_OVERLAP_MODULE.replace("class WordOverlap", "class TwoScores").replace(
            '"n": len(scores)', '"other": sum(scores)'
        )
    )
    with pytest.raises(ValueError, match=r"cannot tell which of the result keys \['other', 'word_overlap'\]"):
        call(EvaluateReward(str(path)), ["a"], ["a"])
    assert call(EvaluateReward(str(path), score_key="other"), ["a b"], ["a"]) == [1.0]


class _HeadOnly(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_fallback_when_evaluate_load_fails(monkeypatch, caplog):
    """The Hub endpoint answers the quick probe (a local server), but evaluate.load('bleu') itself cannot reach
    huggingface.co: the packaged module is used, with one warning saying why."""
    server = HTTPServer(("127.0.0.1", 0), _HeadOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(evaluate_reward_module, "_hub_state", {})
        with caplog.at_level(logging.WARNING, logger=evaluate_reward_module.__name__):
            module = load_metric("bleu")
    finally:
        server.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    if evaluate_reward_module._hub_state.get("unreachable"):
        assert len(messages) == 1 and "evaluate.load('bleu') failed" in messages[0]
        assert "sacrebleu" in module.description
    else:  # a machine that does reach the Hub loads the Hub's module
        assert messages == []
    assert module.compute(predictions=["a b c d"], references=[["a b c d"]])["bleu"] == pytest.approx(1.0)


def test_fallback_when_the_hub_does_not_answer(monkeypatch, caplog):
    """No offline variable, but nothing listens at the Hub endpoint: the quick probe fails and evaluate.load is not
    even tried (no retries, no timeouts)."""
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(evaluate_reward_module, "_hub_state", {})
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger=evaluate_reward_module.__name__):
        reward = EvaluateReward("chrf")
        values = call(reward)
    assert time.perf_counter() - start < 5
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["the Hugging Face Hub does not answer"]
    assert values == [None if v is None else 100 * v for v in call(ChrFReward())]
