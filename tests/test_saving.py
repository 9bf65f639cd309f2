"""What `save_model`, checkpoints and `push_to_hub` write: folders that PEFT/transformers load, a critic that reloads
into a trainer, TRL's model card; resuming from the ordinary layout stays bit-identical."""

import concurrent.futures
import json
import os
import shutil
import types

import huggingface_hub
import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from peft import AutoPeftModelForCausalLM, LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trl_gae_ext import PPOTrainer, ValueHead
from trl_gae_ext.tiny import build_tiny_model


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1, response_length=4, learning_rate=1e-2, total_episodes=4, temperature=1.0, logging_steps=1,
    )  # fmt: skip
    return offline_args(tmp_path, **{**defaults, **overrides})


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")


def value_model(tokenizer, seed=1):
    return build_tiny_model(
        tokenizer, hidden_size=32, num_attention_heads=2, model_class=AutoModelForSequenceClassification,
        num_labels=1, seed=seed,
    )  # fmt: skip


# id: (value_head, PEFT policy, critic from a sequence classifier)
LAYOUTS = {
    "shared": ("shared", False, False),
    "separate": ("separate", False, False),
    "adapter": ("adapter", True, False),
    "shared-lora": ("shared", True, False),
    "score-head": ("separate", False, True),
}


@pytest.fixture
def build(tokenizer, tiny_model_dir):
    """`build(tmp_path, case, model=None, **args)`: a trainer for a `LAYOUTS` case. PEFT cases start from the tiny
    model saved to disk, since an adapter names its base by path."""

    def build(tmp_path, case, model=None, eval_dataset=None, **overrides):
        value_head, peft, classifier = LAYOUTS[case]
        if model is None:
            model = tiny_model_dir if peft else build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2)
        return PPOTrainer(
            model,
            length_reward,
            args=make_args(tmp_path, value_head=value_head, **overrides),
            train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora() if peft and isinstance(model, str) else None,
            value_model=value_model(tokenizer) if classifier else None,
        )

    return build


def load_policy(folder, peft):
    loader = AutoPeftModelForCausalLM if peft else AutoModelForCausalLM
    return loader.from_pretrained(folder, is_trainable=True) if peft else loader.from_pretrained(folder)


IDS = torch.tensor([[3, 5, 6, 7, 8, 9]])


@torch.no_grad()
def logprobs_and_values(trainer):
    out = trainer.model(IDS, torch.ones_like(IDS), num_response_tokens=3)
    return out["logprobs"], out["values"]


def wrapper_keyed_files(folder):
    """safetensors files holding `PolicyValueModel` state-dict keys (the old checkpoint format)."""
    found = []
    for root, _, files in os.walk(folder):
        for file in files:
            if file.endswith(".safetensors"):
                keys = load_file(os.path.join(root, file))
                if any(k.startswith(("policy.", "value_head.", "critic.")) for k in keys):
                    found.append(os.path.relpath(os.path.join(root, file), folder))
    return found


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_saved_folder_loads_in_peft_or_transformers_and_the_critic_reloads(tmp_path, build, case):
    _, peft, classifier = LAYOUTS[case]
    trainer = build(tmp_path, case)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))

    policy = load_policy(out, peft)
    torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)
    head_file = "score_head.safetensors" if classifier else "value_head.safetensors"
    assert (out / "critic" / head_file).is_file() and not (out / "critic" / "value_head.pt").exists()
    assert wrapper_keyed_files(out) == []
    if not classifier:
        head = ValueHead.from_pretrained(out / "critic")
        hidden = torch.randn(2, 3, 32)
        torch.testing.assert_close(head(hidden), trainer.model.value_head(hidden), rtol=0, atol=0)

    # continue training: the saved policy as `model`, then one call for the critic
    fresh = build(tmp_path / "fresh", case, model=policy)
    expected = logprobs_and_values(trainer)
    assert not torch.equal(logprobs_and_values(fresh)[1], expected[1])
    fresh.load_critic(str(out))
    for got, want in zip(logprobs_and_values(fresh), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_critic_names_a_layout_mismatch(tmp_path, build):
    trainer = build(tmp_path, "separate")
    trainer.save_model(str(tmp_path / "saved"))
    other = build(tmp_path / "other", "shared")
    with pytest.raises(ValueError, match="'separate' critic with a ValueHead.*'shared'"):
        other.load_critic(str(tmp_path / "saved"))


def test_only_the_policy_and_critic_adapters_are_saved_never_ref(tmp_path, build):
    trainer = build(tmp_path, "adapter", save_strategy="steps", save_steps=1)
    assert "ref" in trainer.model.policy.peft_config  # the frozen reference adapter the trainer adds
    trainer.train()
    for folder in (tmp_path / "saved", tmp_path / "out" / "checkpoint-1"):
        if folder.name == "saved":
            trainer.save_model(str(folder))
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["critic"]
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        assert json.loads((folder / "critic" / "adapter_config.json").read_text())["r"] == 4
        policy = AutoPeftModelForCausalLM.from_pretrained(folder)
        assert list(policy.peft_config) == ["default"]
        torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)


def test_a_policy_adapter_with_another_name_is_saved_at_the_top(tmp_path, build, tiny_model_dir):
    from peft import get_peft_model

    named = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora(), adapter_name="sft")
    trainer = build(tmp_path, "adapter", model=named)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir() if p.is_dir()) == ["critic"]
    policy = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)


def test_load_best_model_at_end_reads_the_best_checkpoint(tmp_path, build):
    evals = Dataset.from_dict({"prompt": make_prompts(4)})
    trainer = build(tmp_path, "adapter", eval_dataset=evals, total_episodes=12, save_strategy="steps", save_steps=1,
                    eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="reward",
                    greater_is_better=True, seed=3)  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")  # the last step was not the best one
    policy = AutoPeftModelForCausalLM.from_pretrained(best, is_trainable=True)
    torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)
    fresh = build(tmp_path / "fresh", "adapter", model=policy)
    fresh.load_critic(best)
    for got, want in zip(logprobs_and_values(fresh), logprobs_and_values(trainer)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_checkpoints_hold_the_loadable_layout_and_the_trainer_state(tmp_path, build):
    trainer = build(tmp_path, "adapter", total_episodes=8, save_strategy="steps", save_steps=1)
    trainer.train()
    last = tmp_path / "out" / "checkpoint-2"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "README.md"):
        assert (last / name).is_file(), name
    assert wrapper_keyed_files(tmp_path / "out") == []
    policy = AutoPeftModelForCausalLM.from_pretrained(last, is_trainable=True)
    torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)
    fresh = build(tmp_path / "fresh", "adapter", model=policy)
    fresh.load_critic(str(last))
    for got, want in zip(logprobs_and_values(fresh), logprobs_and_values(trainer)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def run(build, tmp_path, case, output, resume=None, **overrides):
    trainer = build(tmp_path, case, output_dir=str(tmp_path / output), total_episodes=16, num_mini_batches=2,
                    save_strategy="steps", save_steps=2, **overrides)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("case", ["adapter", "score-head"])
def test_resume_from_the_ordinary_layout_is_bit_identical(tmp_path, build, case):
    straight = run(build, tmp_path, case, "straight")
    resumed = run(build, tmp_path, case, "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert straight.state.global_step == resumed.state.global_step == 4
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_keeps_the_first_rollouts_score_scale(tmp_path, build):
    """`scale_scores="first"`: the critic's values are in units of the first rollout's score spread, so the scale is
    saved with the critic and a resumed run goes on with it rather than refitting it on a later rollout."""
    straight = run(build, tmp_path, "adapter", "straight", scale_scores="first")
    saved = json.loads((tmp_path / "straight" / "checkpoint-2" / "critic" / "critic_layout.json").read_text())
    assert saved["score_scale"] == straight.model.score_scale > 0
    resumed = run(build, tmp_path, "adapter", "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"),
                  scale_scores="first")  # fmt: skip
    assert resumed.model.score_scale == straight.model.score_scale
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_on_a_4bit_base_with_the_adapter_critic(tmp_path, tokenizer, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    def run_4bit(output, resume=None):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        args = make_args(tmp_path, output_dir=str(tmp_path / output), value_head="adapter", total_episodes=8,
                         save_strategy="steps", save_steps=1)  # fmt: skip
        trainer = PPOTrainer(tiny_model_dir, length_reward, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}),
                             quantization_config=quant, peft_config=lora())  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}

    straight = run_4bit("straight")
    resumed = run_4bit("resumed", resume=str(tmp_path / "straight" / "checkpoint-1"))
    assert straight.keys() == resumed.keys() and any(".critic." in n for n in straight)
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=0, msg=name)


def test_a_0_1_0_checkpoint_still_resumes(tmp_path, build):
    from trl_gae_ext.saving import load_checkpoint

    trainer = build(tmp_path, "adapter")
    trainer.train()
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    legacy = tmp_path / "checkpoint-1"
    legacy.mkdir()
    from safetensors.torch import save_file

    save_file(trainable, str(legacy / "model.safetensors"))  # 0.1.0 wrote the trainable tensors, wrapper-keyed
    fresh = build(tmp_path / "fresh", "adapter")
    load_checkpoint(fresh.model, str(legacy))
    params = dict(fresh.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trainable.items())


def test_tied_weights_reload_in_place(tmp_path, tokenizer):
    from trl_gae_ext.saving import load_weights_in_place

    model = build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # written once
    expected = model(IDS).logits
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_weights_in_place(model, str(tmp_path))
    torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=0)


class LocalHub:
    """A stand-in for the Hub's `create_repo`/`upload_folder`: uploads land in a local folder per repository,
    filtered by the same patterns the Hub client applies."""

    def __init__(self, root):
        self.root, self.commits = root, []

    def create_repo(self, api, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, commit_message=None,
                      ignore_patterns=None, run_as_future=False, **kwargs):  # fmt: skip
        files = [
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, names in os.walk(folder_path) for f in names
        ]
        files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        for file in files:
            target = self.root / repo_id / (path_in_repo or "") / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(folder_path, file), target)
        self.commits.append((commit_message, path_in_repo, sorted(files)))
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(None)
            return future


@pytest.fixture
def hub(tmp_path, monkeypatch):
    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: local.create_repo(api, repo_id)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: local.upload_folder(api, **kw))
    return local


@pytest.mark.parametrize("case", ["shared", "adapter", "separate"])
def test_push_to_hub_uploads_a_loadable_repository_with_the_model_card(tmp_path, build, hub, case):
    _, peft, _ = LAYOUTS[case]
    trainer = build(tmp_path, case, hub_model_id="someone/ppo-tiny")
    trainer.model.policy.config._name_or_path = "someone/tiny-llama"  # as if loaded from the Hub
    trainer.train()
    trainer.push_to_hub(dataset_name="someone/prompts")

    repo = hub.root / "someone" / "ppo-tiny"
    (_, _, files), *_ = hub.commits
    top = {"adapter_config.json", "adapter_model.safetensors"} if peft else {"config.json", "model.safetensors"}
    assert top | {"README.md", "critic/critic_layout.json", "critic/value_head.safetensors"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files) and wrapper_keyed_files(repo) == []
    policy = load_policy(repo, peft)
    torch.testing.assert_close(policy(IDS).logits, trainer.model.policy(IDS).logits, rtol=0, atol=0)

    card = ModelCard.load(repo / "README.md")
    assert {"trl", "ppo", "gae", "trl-gae-ext"} <= set(card.data.tags)
    assert card.data.base_model == "someone/tiny-llama" and card.data.datasets == "someone/prompts"
    assert card.data.library_name == ("peft" if peft else "transformers")
    card_rows = ("| `lam` | 0.95 |", "| `value_head_return_scale` | False |")
    for text in ("arXiv:1707.06347", "arXiv:1506.02438", *card_rows, f'value_head="{case}"'):
        assert text in card.text, text


def test_save_model_pushes_and_every_save_pushes_the_critic_too(tmp_path, build, hub):
    trainer = build(tmp_path, "adapter", hub_model_id="someone/ppo-tiny", push_to_hub=True,
                           hub_strategy="every_save", save_strategy="steps", save_steps=1)  # fmt: skip
    trainer.train()  # pushes output_dir after copying checkpoint-1 into it
    assert hub.commits and hub.commits[0][0] == "Training in progress, step 1"
    assert {"critic/adapter_model.safetensors", "critic/value_head.safetensors", "README.md"} <= set(hub.commits[0][2])
    trainer.save_model()
    assert hub.commits[-1][0] == "Model save"
    repo = hub.root / "someone" / "ppo-tiny"
    fresh = build(tmp_path / "fresh", "adapter", model=load_policy(repo, peft=True))
    fresh.load_critic(str(repo))
    for got, want in zip(logprobs_and_values(fresh), logprobs_and_values(trainer)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
