"""Text-metric rewards: equality with sacrebleu / rouge_score, CJK, QA metrics, the TRL protocol, bad inputs,
pickling, the registry and the shaping wrappers. Offline, real libraries, nothing mocked."""

import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from trl_gae_ext.rewards import (
    REWARD_REGISTRY,
    BleuReward,
    ChrFReward,
    EvaluateReward,
    ExactMatchReward,
    MissingColumnError,
    RougeReward,
    TokenF1Reward,
    clip_reward,
    get_reward,
    length_penalty,
    scale_reward,
)
from trl_gae_ext.rewards.tokenize import CJKRougeTokenizer, has_cjk


# Words with casing, punctuation, digits, contractions, hyphens and accents, to exercise every tokenizer.
VOCAB = (
    "the The a cat cats dog dog's sat sits sitting on mat mats . , ! ? ; running ran runner New York "
    '2024 3.5 don\'t well-known (hello) "quoted" naïve café über 100% e-mail U.S. -- and or'
).split()


def random_sentence(rng, low=1, high=25):
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(low, high)))


def random_pairs(seed, n, max_refs=1):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        hyp = random_sentence(rng)
        refs = [random_sentence(rng) for _ in range(rng.randint(1, max_refs))]
        if rng.random() < 0.3:  # partial copies give high, non-trivial scores
            words = hyp.split()
            refs[0] = " ".join(words[: rng.randint(1, len(words))] + refs[0].split()[:5])
        pairs.append((hyp, refs))
    return pairs


def call(reward, completions, references, **extra):
    return reward(prompts=["p"] * len(completions), completions=completions, reference=references, **extra)


# -- BLEU ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lowercase": True},
        {"smooth_method": "floor", "smooth_value": 0.1},
        {"smooth_method": "add-k"},
        {"smooth_method": "none"},
        {"tokenize": "intl"},
        {"tokenize": "char"},
    ],
)
@pytest.mark.parametrize("max_refs", [1, 3])
def test_bleu_equals_sacrebleu_sentence_bleu(options, max_refs):
    pairs = random_pairs(seed=len(options) + 10 * max_refs, n=200, max_refs=max_refs)
    reward = BleuReward(**options)
    got = call(reward, [h for h, _ in pairs], [refs if max_refs > 1 else refs[0] for _, refs in pairs])
    sacre_options = {"tokenize": "13a", **options}  # no CJK text here: "auto" means 13a
    expected = [sacrebleu.sentence_bleu(h, refs, **sacre_options).score / 100 for h, refs in pairs]
    assert got == [min(e, 1.0) for e in expected]  # sacrebleu gives 100.00000000000004 for a perfect match
    assert 0.0 < max(got) <= 1.0 and min(got) >= 0.0


def test_bleu_auto_tokenizer_picks_zh_for_cjk():
    pairs = [
        ("我爱北京天安门", ["我爱北京"]),
        ("今天天气很好", ["今天天气不错", "天气很好"]),
        ("the cat", ["the cat sat"]),
    ]
    got = call(BleuReward(), [h for h, _ in pairs], [refs for _, refs in pairs])
    expected = [
        sacrebleu.sentence_bleu(h, refs, tokenize="zh" if has_cjk(h, *refs) else "13a").score / 100
        for h, refs in pairs
    ]
    assert got == expected
    # Chinese is scored on characters: equal to BLEU over space-separated characters, and not 0.
    for (h, refs), score in zip(pairs[:2], got):
        chars = sacrebleu.sentence_bleu(" ".join(h), [" ".join(r) for r in refs], tokenize="none").score / 100
        assert score == pytest.approx(chars) and score > 0
    # 13a on unsegmented Chinese sees one "word" per sentence: what `tokenize="auto"` avoids.
    assert call(BleuReward(tokenize="13a"), ["我爱北京天安门"], ["我爱北京"]) == [0.0]


def test_bleu_sentence_score_and_bad_tokenizer():
    score = BleuReward().sentence_score("the cat sat on the mat", ["the cat is on the mat"])
    assert score.score == sacrebleu.sentence_bleu("the cat sat on the mat", ["the cat is on the mat"]).score
    with pytest.raises(Exception, match="nope|tokeniz"):
        BleuReward(tokenize="nope")


# -- ROUGE --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
@pytest.mark.parametrize("measure", ["f", "p", "r"])
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(rouge_type, measure, use_stemmer):
    pairs = random_pairs(seed=len(rouge_type) * 10 + "fpr".index(measure) * 2 + use_stemmer, n=60, max_refs=3)
    if rouge_type == "rougeLsum":  # summary level: newline-separated sentences
        pairs = [(h.replace(" . ", " .\n"), [r.replace(" , ", " ,\n") for r in refs]) for h, refs in pairs]
    reward = RougeReward(rouge_type, measure=measure, use_stemmer=use_stemmer)
    got = call(reward, [h for h, _ in pairs], [refs for _, refs in pairs])
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)
    field = {"f": "fmeasure", "p": "precision", "r": "recall"}[measure]
    expected = [getattr(scorer.score_multi(refs, h)[rouge_type], field) for h, refs in pairs]
    assert got == expected
    assert max(got) > 0


def test_rouge_single_reference_string_equals_score():
    pairs = random_pairs(seed=7, n=100)
    got = call(RougeReward("rougeL"), [h for h, _ in pairs], [refs[0] for _, refs in pairs])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert got == [scorer.score(refs[0], h)["rougeL"].fmeasure for h, refs in pairs]


def test_rouge_scorer_all_types_at_once_equals_rouge_score():
    from trl_gae_ext.rewards.text_metrics import build_rouge_scorer

    types = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]
    ours, theirs = build_rouge_scorer(types), rouge_scorer.RougeScorer(types)
    for hyp, refs in random_pairs(seed=11, n=80, max_refs=3):
        assert ours.score_multi(refs, hyp) == theirs.score_multi(refs, hyp)
        assert ours.score(refs[0], hyp) == theirs.score(refs[0], hyp)


def test_perfect_match_is_exactly_one():
    text = "the cat sat on the mat ."
    for reward in (BleuReward(), RougeReward(), RougeReward("rouge2"), ChrFReward(), TokenF1Reward()):
        assert call(reward, [text, "我爱北京天安门"], [text, "我爱北京天安门"]) == [1.0, 1.0], reward.__name__


def test_rouge_names_and_bad_options():
    assert RougeReward().__name__ == "rougeL"
    assert RougeReward("rouge2", measure="r").__name__ == "rouge2_r"
    with pytest.raises(ValueError, match="rouge_type"):
        RougeReward("rougeX")
    with pytest.raises(ValueError, match="measure"):
        RougeReward(measure="q")


def _as_ascii_tokens(text):
    """Character-level reference computation: each CJK character becomes an ASCII word rouge_score keeps."""
    return "".join(f" u{ord(ch):x} " if has_cjk(ch) else ch for ch in text)


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL"])
def test_rouge_chinese_is_scored_per_character(rouge_type):
    pairs = [
        ("我爱北京天安门", ["我爱北京"]),
        ("今天天气很好，我们去公园散步。", ["今天天气不错，我们去散步吧"]),
        ("模型 GPT-4 在 2024 年发布", ["GPT-4 模型于 2024 年发布", "另一个参考"]),
    ]
    got = call(RougeReward(rouge_type), [h for h, _ in pairs], [refs for _, refs in pairs])
    scorer = rouge_scorer.RougeScorer([rouge_type])
    expected = [
        scorer.score_multi([_as_ascii_tokens(r) for r in refs], _as_ascii_tokens(h))[rouge_type].fmeasure
        for h, refs in pairs
    ]
    assert got == pytest.approx(expected) and min(got) > 0
    # rouge_score's own tokenizer deletes the Chinese text: the silent zero this package avoids.
    assert call(RougeReward(rouge_type, cjk=False), ["我爱北京天安门"], ["我爱北京"]) == [0.0]


def test_cjk_tokenizer():
    tok = CJKRougeTokenizer()
    assert tok.tokenize("我爱 Python-3 编程!") == ["我", "爱", "python", "3", "编", "程"]
    assert tok.tokenize("日本語のテキスト") == list("日本語のテキスト")
    assert tok.tokenize("한국어 문장") == ["한", "국", "어", "문", "장"]
    stemming = CJKRougeTokenizer(use_stemmer=True)
    assert stemming.tokenize("running 跑步") == ["run", "跑", "步"]
    rng = random.Random(0)
    default = rouge_scorer.tokenizers.DefaultTokenizer(use_stemmer=True)
    for _ in range(200):  # identical to rouge_score on text without CJK characters
        text = random_sentence(rng)
        assert stemming.tokenize(text) == default.tokenize(text)


def test_japanese_and_korean_are_scored():
    assert call(RougeReward(), ["今日は良い天気です"], ["今日は天気が良い"])[0] > 0.5
    assert call(RougeReward("rouge1"), ["오늘 날씨가 좋다"], ["오늘은 날씨가 좋네요"])[0] > 0.5
    assert call(BleuReward(), ["今日は良い天気です"], ["今日は良い天気でした"])[0] > 0


# -- chrF ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"word_order": 2}, {"beta": 1, "char_order": 4}, {"eps_smoothing": True}])
def test_chrf_equals_sacrebleu_sentence_chrf(options):
    pairs = random_pairs(seed=3, n=100, max_refs=2)
    got = call(ChrFReward(**options), [h for h, _ in pairs], [refs for _, refs in pairs])
    expected = [sacrebleu.sentence_chrf(h, refs, **options).score / 100 for h, refs in pairs]
    assert got == [min(e, 1.0) for e in expected]
    assert ChrFReward(**options).__name__ == "chrf" + "+" * options.get("word_order", 0)


# -- QA metrics ---------------------------------------------------------------------------------------------------
def test_exact_match():
    reward = ExactMatchReward()
    completions = ["The Eiffel Tower!", "eiffel tower", "Paris", "  42 ", "北京。"]
    references = [["Eiffel Tower", "tower"], "the eiffel tower", "London", "42", "北 京"]
    assert call(reward, completions, references) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert call(ExactMatchReward(normalize=False), completions, references) == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_token_f1_matches_squad():
    reward = TokenF1Reward()
    # "the cat sat on a mat" -> [cat, sat, on, mat]; "a cat on the mat" -> [cat, on, mat]:
    # 3 common, precision 3/4, recall 3/3, F1 = 2 * 0.75 * 1 / 1.75 = 6/7.
    assert call(reward, ["the cat sat on a mat"], ["a cat on the mat"]) == [pytest.approx(6 / 7)]
    # best reference counts; no overlap is 0; both empty after normalization is 1 (SQuAD v2)
    assert call(reward, ["cat", "dog", "The"], [["dog", "cat"], "cat", "a"]) == [1.0, 0.0, 1.0]
    # Chinese: characters are tokens. 北京大学 vs 北京: 2 common, p = 2/4, r = 1, F1 = 2/3.
    assert call(reward, ["北京大学。"], ["北京"]) == [pytest.approx(2 / 3)]
    assert call(TokenF1Reward(cjk=False), ["北京大学"], ["北京"]) == [0.0]


# -- the TRL protocol and bad inputs --------------------------------------------------------------------------------
ALL_REWARDS = [BleuReward(), RougeReward(), RougeReward("rouge2"), ChrFReward(), ExactMatchReward(), TokenF1Reward()]


@pytest.mark.parametrize("reward", ALL_REWARDS, ids=lambda r: r.__name__)
def test_protocol(reward):
    completions = ["the cat sat on the mat", "", "a dog", "   ", "the mat"]
    references = ["the cat sat on the mat", "the cat", None, "x", ["the mat", "a mat"]]
    trl_kwargs = dict(
        completion_ids=[[1, 2]] * 5,
        trainer_state=object(),
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        other_column=[1, 2, 3, 4, 5],
    )
    got = reward(prompts=["p"] * 5, completions=completions, reference=references, **trl_kwargs)
    assert len(got) == 5 and got[0] == 1.0 and got[4] == 1.0
    assert got[1] == 0.0 and got[3] == 0.0  # empty completions
    assert got[2] is None  # no reference: TRL skips it
    assert all(isinstance(v, float) for i, v in enumerate(got) if i != 2)
    # positional call, conversational completions (scored on the assistant text), other reference column
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    assert reward(["p"] * 5, messages, reference=references) == got
    renamed = type(reward)(**{**_init_args(reward), "reference_column": "answer"})
    assert renamed(["p"] * 5, completions, answer=references) == got


def _init_args(reward):
    return {"rouge_type": reward.rouge_type} if isinstance(reward, RougeReward) else {}


def test_conversational_completion_joins_assistant_turns():
    completion = [
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search"}]},
        {"role": "tool", "content": "ignored tool output"},
        {"role": "assistant", "content": [{"type": "text", "text": "the cat sat"}]},
    ]
    assert call(ExactMatchReward(), [completion], ["the cat sat"]) == [1.0]


def test_missing_reference_column_names_it_and_lists_columns():
    reward = BleuReward()
    with pytest.raises(MissingColumnError) as err:
        reward(["p"], ["text"], answer=["x"], id=[0], trainer_state=None, completion_ids=[[1]], log_metric=None)
    message = str(err.value)
    assert "'reference'" in message and "['answer', 'id']" in message and "trainer_state" not in message
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(KeyError, match="'answer'"):
        BleuReward(reference_column="answer")(["p"], ["text"], reference=["x"])


@pytest.mark.parametrize("reward", ALL_REWARDS, ids=lambda r: r.__name__)
def test_type_errors_name_column_and_type(reward):
    with pytest.raises(TypeError, match=r"column 'reference' row 1 has type int"):
        reward(["p", "p"], ["a", "b"], reference=["a", 3])
    with pytest.raises(TypeError, match=r"column 'reference' row 0 holds a value of type float"):
        reward(["p"], ["a"], reference=[["a", 1.5]])
    with pytest.raises(TypeError, match=r"column 'completions' row 0 has type int"):
        reward(["p"], [7], reference=["a"])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        reward(["p"], ["a"], reference=["a", "b"])


# -- pickling, registry, shaping ----------------------------------------------------------------------------------
def test_rewards_pickle_after_use():
    rewards = [*ALL_REWARDS, scale_reward(BleuReward(), 2.0), length_penalty(RougeReward(), max_length=3)]
    completions, references = ["the cat sat on the mat", "我爱北京"], ["the cat is on the mat", "我爱北京天安门"]
    for reward in rewards:
        before = call(reward, completions, references)
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == reward.__name__
        assert call(clone, completions, references) == before


def test_registry():
    expected_names = {
        "bleu": "bleu",
        "rouge1": "rouge1",
        "rouge2": "rouge2",
        "rougeL": "rougeL",
        "rougeLsum": "rougeLsum",
        "chrf": "chrf",
        "chrf++": "chrf++",
        "exact_match": "exact_match",
        "token_f1": "token_f1",
    }
    for key, name in expected_names.items():
        assert get_reward(key).__name__ == name
    assert set(REWARD_REGISTRY) == {*expected_names, "evaluate"}
    reward = get_reward("evaluate:rouge", score_key="rouge1")
    assert isinstance(reward, EvaluateReward) and reward.__name__ == "evaluate_rouge_rouge1"
    assert get_reward("rouge2", measure="p", reference_column="answer").reference_column == "answer"
    with pytest.raises(ValueError, match=r"Unknown reward 'blue'.*bleu, rouge1.*token_f1, evaluate:<metric>"):
        get_reward("blue")


def plain_reward(prompts, completions, **kwargs):
    return [float(len(c)) if c != "none" else None for c in completions]


def test_shaping_wrappers():
    completions = ["a b c", "a b c d e f", "none", "a"]
    scaled = scale_reward(plain_reward, scale=2.0, shift=-1.0)
    assert scaled.__name__ == "plain_reward_scaled"
    assert scaled(["p"] * 4, completions) == [9.0, 21.0, None, 1.0]
    clipped = clip_reward(plain_reward, low=2.0, high=6.0, name="bounded")
    assert clipped.__name__ == "bounded" and clipped(["p"] * 4, completions) == [5.0, 6.0, None, 2.0]
    # words: 3 and 6 words against max 4 -> excess 0 and (6 - 4) / 4; 1 word against min 2 -> (2 - 1) / 2
    penalized = length_penalty(plain_reward, max_length=4, min_length=2, penalty=2.0)
    assert penalized.__name__ == "plain_reward_length_penalized"
    assert penalized(["p"] * 4, completions) == [5.0, 11.0 - 2.0 * 0.5, None, 1.0 - 2.0 * 0.5]
    by_tokens = length_penalty(plain_reward, max_length=2, unit="tokens")
    ids = [[1, 2], [1, 2, 3, 4], [1], [1]]
    assert by_tokens(["p"] * 4, completions, completion_ids=ids) == [5.0, 11.0 - 1.0, None, 1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        by_tokens(["p"], ["a"])
    with pytest.raises(ValueError, match="reversed"):
        clip_reward(plain_reward, low=1, high=0)
    assert pickle.loads(pickle.dumps(penalized))(["p"] * 4, completions) == penalized(["p"] * 4, completions)


def test_import_is_light():
    code = (
        "import sys, trl_gae_ext.rewards; "
        "print(sorted(m for m in ('torch', 'transformers', 'evaluate', 'rouge_score', 'nltk') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.strip() == "[]"
