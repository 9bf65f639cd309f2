"""PPOTrainer end to end on tiny models built from configs (offline, CPU)."""

import copy
import logging

import pytest
import torch
from conftest import make_prompts, offline_args
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, TrainerCallback

from trl_gae_ext import AdaptiveKLCallback, LambdaScheduleCallback, PPOTrainer
from trl_gae_ext.tiny import build_tiny_model


def first_is_alpha(prompts, completions, completion_ids, **kwargs):
    """1 when the response starts with the token 'alpha' (id looked up once per test session)."""
    return [1.0 if ids and ids[0] == first_is_alpha.token_id else 0.0 for ids in completion_ids]


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) / 4 for c in completions]


@pytest.fixture(autouse=True)
def _alpha_id(tokenizer):
    first_is_alpha.token_id = tokenizer.convert_tokens_to_ids("alpha")


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, response_length=5, learning_rate=3e-3, total_episodes=16, kl_coef=0.05, temperature=1.0, logging_steps=1,
    )  # fmt: skip
    return offline_args(tmp_path, **{**defaults, **overrides})


def make_model(tokenizer, seed=0):
    return build_tiny_model(tokenizer, hidden_size=32, num_attention_heads=2, seed=seed)


def trainable_snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def changed(before, trainer, prefix=""):
    after = dict(trainer.model.named_parameters())
    return {n for n, p in before.items() if n.startswith(prefix) and not torch.equal(p, after[n].detach())}


def dataset(n=16, **columns):
    return Dataset.from_dict({"prompt": make_prompts(n), **columns})


LAYOUTS = [
    pytest.param({"value_head": "separate"}, None, id="separate-copy"),
    pytest.param({"value_head": "shared"}, None, id="shared"),
    pytest.param({"value_head": "adapter"}, "lora", id="adapter-lora"),
    pytest.param({"value_head": "separate"}, "value_model", id="separate-value-model"),
    pytest.param({"advantage_level": "sequence"}, None, id="sequence-level"),
    pytest.param({"lam_critic": 1.0, "lam": 0.9, "bootstrap_truncated": True}, None, id="decoupled-bootstrap"),
    pytest.param({"lam_adaptive_alpha": 0.5, "whiten_rewards": True, "kl_estimator": "k3"}, None, id="adaptive-lam"),
    pytest.param({"kl_in_reward": False, "kl_estimator": "k3", "dual_clip": 3.0}, None, id="kl-loss-dual-clip"),
    pytest.param({"entropy_coef": 0.01, "loss_aggregation": "seq_mean", "trainable_layers": 1}, None, id="last-layer"),
]


@pytest.mark.parametrize("overrides, extra", LAYOUTS)
def test_every_layout_trains_policy_and_critic(tmp_path, tokenizer, overrides, extra):
    kwargs = {}
    if extra == "lora":
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    if extra == "value_model":
        kwargs["value_model"] = build_tiny_model(
            tokenizer, hidden_size=32, num_attention_heads=2, model_class=AutoModelForSequenceClassification,
            num_labels=1, seed=1,
        )  # fmt: skip
    trainer = PPOTrainer(
        make_model(tokenizer),
        length_reward,
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset(),
        processing_class=tokenizer,
        **kwargs,
    )
    before = trainable_snapshot(trainer)
    trainer.train()
    moved = changed(before, trainer)
    assert any(n.startswith("policy.") for n in moved), "the policy did not learn"
    assert any(n.startswith("value_head.") for n in moved), "the value head did not learn"
    if extra == "lora":
        assert any(".default." in n for n in moved) and any(".critic." in n for n in moved)
        assert not any("lora_" not in n and n.startswith("policy.") for n in before)  # base frozen
    if overrides.get("trainable_layers") == 1:
        policy_params = [n for n in before if n.startswith("policy.")]
        assert not any(".layers.0." in n for n in policy_params) and any(".layers.1." in n for n in policy_params)
    logs = trainer.state.log_history
    for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/explained_var"):
        assert any(key in h for h in logs), key
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def alpha_share(prompts, completions, completion_ids, **kwargs):
    """The share of the 4 response tokens that are 'alpha' (1 of 36 tokens under the random start)."""
    return [sum(i == first_is_alpha.token_id for i in ids) / 4 for ids in completion_ids]


def test_mean_reward_rises_on_a_toy_task(tmp_path, tokenizer):
    # with args.seed fixing every initialisation, seeds 0-4 went from ~0.03 to 0.64-0.78 over these 24 iterations
    args = make_args(
        tmp_path, per_device_train_batch_size=8, total_episodes=384, response_length=4, kl_coef=0.01, logging_steps=4
    )
    trainer = PPOTrainer(make_model(tokenizer), alpha_share, args=args, train_dataset=dataset(64),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    assert len(scores) == 24
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert start < 0.1 and end > 0.45, scores


def test_args_seed_alone_fixes_the_value_head_initialisation(tmp_path, tokenizer):
    def head(seed, disturb):
        torch.manual_seed(disturb)  # whatever the caller did to the global RNG before
        trainer = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, seed=seed, value_head="shared"),
                             train_dataset=dataset(), processing_class=tokenizer)  # fmt: skip
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("value_head.")}

    a, b, c = head(seed=0, disturb=1), head(seed=0, disturb=2), head(seed=1, disturb=1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_critic_warmup_trains_only_the_critic(tmp_path, tokenizer):
    trainer = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, critic_warmup_steps=2,
                         total_episodes=16), train_dataset=dataset(), processing_class=tokenizer)  # fmt: skip
    before = trainable_snapshot(trainer)
    trainer.train()  # 2 iterations, both warm-up
    assert not changed(before, trainer, "policy.")
    assert changed(before, trainer, "value_head.") and changed(before, trainer, "critic.")
    assert not any("loss/policy_avg" in h for h in trainer.state.log_history)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer):
    def run(output, resume=None, episodes=24):
        args = make_args(tmp_path, output_dir=str(tmp_path / output), total_episodes=episodes, save_strategy="steps",
                         save_steps=4)  # fmt: skip
        callbacks = [AdaptiveKLCallback(target=0.5, horizon=10)]
        trainer = PPOTrainer(make_model(tokenizer), length_reward, args=args, train_dataset=dataset(24),
                             processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    resumed = run("resumed", resume=str(tmp_path / "straight" / "checkpoint-4"))
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert straight.state.global_step == resumed.state.global_step == 12
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert straight.args.kl_coef == resumed.args.kl_coef != 0.05  # the adapted coefficient was restored


class SetKnobs(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_rollout_end(self, args, state, control, stats=None, **kwargs):
        self.seen.append(stats)
        if stats["iteration"] == 1:
            args.kl_coef = 0.0


def test_callbacks_see_stats_and_their_changes_take_effect(tmp_path, tokenizer):
    spy = SetKnobs()
    schedule = LambdaScheduleCallback(start=1.0, end=0.5, num_iterations=2)
    args = make_args(tmp_path, total_episodes=24, logging_steps=4)
    trainer = PPOTrainer(make_model(tokenizer), length_reward, args=args, train_dataset=dataset(24),
                         processing_class=tokenizer, callbacks=[spy, schedule])  # fmt: skip
    trainer.train()
    assert len(spy.seen) == 3 and spy.seen[0]["iteration"] == 0 and spy.seen[0]["episodes"] == 8
    # the policy equals the reference at the first rollout, so the KL penalty shows from the second one on
    assert [s["kl_coef"] for s in spy.seen] == [0.05, 0.05, 0.0]
    assert spy.seen[1]["objective/non_score_reward"] != 0.0 and spy.seen[2]["objective/non_score_reward"] == 0.0
    assert [s["lam"] for s in spy.seen] == [1.0, 0.75, 0.5]


def test_adaptive_kl_controller_moves_towards_target(tmp_path, tokenizer):
    adaptive = AdaptiveKLCallback(target=1e6, horizon=8)  # KL far below target: the coefficient must shrink
    trainer = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, total_episodes=24),
                         train_dataset=dataset(24), processing_class=tokenizer, callbacks=[adaptive])  # fmt: skip
    trainer.train()
    # each rollout: e = clip(KL/target - 1, -0.2, 0.2) = -0.2, beta *= 1 - 0.2 * 8 / 8
    assert trainer.args.kl_coef == pytest.approx(0.05 * 0.8**3)


def test_conversational_prompts(tmp_path, tokenizer):
    data = Dataset.from_dict({"prompt": make_prompts(8, conversational=True)})
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(completions)
        return [1.0] * len(prompts)

    trainer = PPOTrainer(make_model(tokenizer), reward, args=make_args(tmp_path, total_episodes=8),
                         train_dataset=data, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert seen and all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen)


def test_save_model_round_trip(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    trainer = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, total_episodes=8),
                         train_dataset=dataset(8), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.model.policy(ids).logits)
    fresh = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, total_episodes=8),
                       train_dataset=dataset(8), processing_class=tokenizer)  # fmt: skip
    fresh.model.load_critic(str(tmp_path / "saved"))
    for (n, p), q in zip(trainer.model.value_head.named_parameters(), fresh.model.value_head.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(
        trainer.model.critic.layers[0].mlp.up_proj.weight, fresh.model.critic.layers[0].mlp.up_proj.weight
    )


def test_evaluate_scores_greedy_completions(tmp_path, tokenizer):
    trainer = PPOTrainer(make_model(tokenizer), [length_reward, first_is_alpha], args=make_args(tmp_path),
                         train_dataset=dataset(), eval_dataset=dataset(6), processing_class=tokenizer)  # fmt: skip
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_reward", "eval_rewards/length_reward/mean", "eval_rewards/first_is_alpha/mean"}
    total = metrics["eval_rewards/length_reward/mean"] + metrics["eval_rewards/first_is_alpha/mean"]
    assert metrics["eval_reward"] == pytest.approx(total)
    assert 0 < metrics["eval_rewards/length_reward/mean"] <= 5 / 4  # at most response_length words


# -- bad input and faults -------------------------------------------------------------------------------------------


def build(tmp_path, tokenizer, reward=length_reward, data=None, **overrides):
    return PPOTrainer(make_model(tokenizer), reward, args=make_args(tmp_path, **overrides),
                      train_dataset=dataset() if data is None else data, processing_class=tokenizer)  # fmt: skip


def test_dataset_without_prompt_column(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"'prompt' column; its columns are \['question'\]"):
        build(tmp_path, tokenizer, data=Dataset.from_dict({"question": ["a"] * 8}))


def test_empty_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="is empty"):
        build(tmp_path, tokenizer, data=Dataset.from_dict({"prompt": []}))


def test_dataset_smaller_than_a_rollout(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="fewer than one rollout batch"):
        build(tmp_path, tokenizer, data=dataset(4))


def test_reward_needs_a_missing_column(tmp_path, tokenizer):
    def needs_answer(prompts, completions, answer, **kwargs):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match=r"'needs_answer' needs the dataset column\(s\) \['answer'\].*\['prompt'\]"):
        build(tmp_path, tokenizer, reward=needs_answer)


def test_reward_columns_are_passed_as_keyword_lists(tmp_path, tokenizer):
    calls = []

    def uses_answer(prompts, completions, answer, **kwargs):
        calls.append((list(prompts), list(answer)))
        return [0.0] * len(prompts)

    data = dataset(8, answer=[f"answer {i}" for i in range(8)])
    build(tmp_path, tokenizer, reward=uses_answer, data=data, total_episodes=8).train()
    prompts, answers = calls[0]
    index = {p: i for i, p in enumerate(data["prompt"])}
    assert answers == [f"answer {index[p]}" for p in prompts]


@pytest.mark.parametrize(
    "output, error",
    [
        (lambda n: [0.0] * (n - 1), r"'bad' returned 7 rewards for 8 completions"),
        (lambda n: [float("inf")] * n, r"'bad' returned inf"),
        (lambda n: 1.0 / 0, r"'bad' raised ZeroDivisionError"),
    ],
)
def test_bad_reward_outputs_name_the_function(tmp_path, tokenizer, output, error):
    def bad(prompts, completions, **kwargs):
        return output(len(prompts))

    trainer = build(tmp_path, tokenizer, reward=bad, total_episodes=8)
    with pytest.raises((ValueError, RuntimeError), match=error):
        trainer.train()


def test_none_rewards_are_skipped(tmp_path, tokenizer):
    def half_none(prompts, completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(prompts))]

    trainer = build(tmp_path, tokenizer, reward=[half_none, length_reward], total_episodes=8)
    trainer.train()
    mean = [h["rewards/half_none/mean"] for h in trainer.state.log_history if "rewards/half_none/mean" in h]
    assert mean and all(m == 1.0 for m in mean)  # the None entries do not drag the mean to 0.5


def test_non_finite_loss_never_reaches_the_weights(tmp_path, tokenizer):
    def huge(prompts, completions, **kwargs):
        return [3e38] * len(prompts)  # finite, but its square overflows in the value loss

    trainer = build(tmp_path, tokenizer, reward=huge, total_episodes=8, whiten_advantages=False)
    before = trainable_snapshot(trainer)
    trainer.train()
    assert not changed(before, trainer)
    assert trainer.nonfinite_guard.skipped == 4
    assert trainer.state.log_history[0]["ppo/skipped_updates"] >= 1


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path, tokenizer):
    no_pad = copy.deepcopy(tokenizer)  # the session tokenizer stays untouched
    no_pad.pad_token = None
    trainer = PPOTrainer(make_model(tokenizer), length_reward, args=make_args(tmp_path, total_episodes=8),
                         train_dataset=dataset(8), processing_class=no_pad)  # fmt: skip
    assert trainer.processing_class.pad_token == trainer.processing_class.eos_token
    trainer.train()


def test_long_prompts_are_truncated_left_with_one_warning(tmp_path, tokenizer, caplog):
    data = Dataset.from_dict({"prompt": ["alpha beta gamma delta epsilon zeta eta theta"] * 8})
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append(prompts)
        return [0.0] * len(prompts)

    trainer = build(tmp_path, tokenizer, reward=reward, data=data, max_prompt_length=3, total_episodes=16)
    with caplog.at_level(logging.WARNING, logger="trl_gae_ext.trainer"):
        trainer.train()
    warnings = [r for r in caplog.records if "truncated on the left" in r.message]
    assert len(warnings) == 1
    ids, _ = trainer._tokenize_prompts(["alpha beta gamma delta"])
    assert tokenizer.decode(ids[0]) == "beta gamma delta"


@pytest.mark.parametrize(
    "field, value, valid",
    [("value_head", "critic", "'auto', 'shared'"), ("kl_estimator", "k4", "'k1', 'k2', 'k3'"),
     ("advantage_level", "episode", "'token', 'sequence'")],
)  # fmt: skip
def test_unknown_choices_list_the_valid_values(tmp_path, field, value, valid):
    with pytest.raises(ValueError, match=f"Valid values: {valid}"):
        make_args(tmp_path, **{field: value})


def test_k1_as_a_kl_loss_warns_and_the_working_combinations_do_not(tmp_path, recwarn):
    with pytest.warns(UserWarning, match="expected gradient is zero"):
        make_args(tmp_path, kl_estimator="k1", kl_in_reward=False)
    recwarn.clear()
    make_args(tmp_path, kl_estimator="k3", kl_in_reward=False)
    make_args(tmp_path, kl_estimator="k1", kl_in_reward=True)
    make_args(tmp_path, kl_estimator="k1", kl_in_reward=False, kl_coef=0.0)
    assert not [w for w in recwarn if "expected gradient is zero" in str(w.message)]


def test_without_a_stop_token_responses_run_past_eos_to_the_full_length(tmp_path, tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():  # make EOS likely, so that many responses sample it before their last token
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight.mean(0) + 4.0 * model.lm_head.weight.std()
    args = make_args(tmp_path, stop_token=None, response_length=8, per_device_train_batch_size=8, total_episodes=16)
    trainer = PPOTrainer(model, lambda completions, **kw: [0.0] * len(completions), args=args,
                         train_dataset=dataset(16), processing_class=tokenizer)  # fmt: skip
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    ids, mask = trainer._tokenize_prompts(make_prompts(32))
    torch.manual_seed(0)
    responses = trainer._generate(wrapper, ids, mask, trainer._generation_config(tokenizer, sampling=True))
    assert responses.shape == (32, 8)
    eos = responses[:, :-1] == tokenizer.eos_token_id
    assert eos.any(), "the test needs sampled EOS tokens before the last position"
    # generation went on after each EOS: what follows is sampled text, not padding
    rows, cols = eos.nonzero(as_tuple=True)
    assert (responses[rows, cols + 1] != tokenizer.pad_token_id).float().mean() > 0.5
    assert wrapper.policy.generation_config.eos_token_id == tokenizer.eos_token_id  # restored after the call
    trainer.train()
    assert trainer._rollout.response_mask.all()  # every sampled token is an action


def test_async_rewards_and_a_reward_model_without_saved_tokenizer(tmp_path, tokenizer, caplog):
    async def async_one(prompts, completions, **kwargs):
        return [1.0] * len(prompts)

    reward_model = build_tiny_model(
        tokenizer, hidden_size=32, num_attention_heads=2, model_class=AutoModelForSequenceClassification,
        num_labels=1, seed=3,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_gae_ext.scoring"):
        trainer = PPOTrainer(make_model(tokenizer), [async_one, reward_model], args=make_args(
            tmp_path, total_episodes=8, reward_weights=[0.5, 2.0]), train_dataset=dataset(8),
            processing_class=tokenizer)  # fmt: skip
    assert any("no saved tokenizer" in r.message for r in caplog.records)
    assert trainer.reward_func_names[0] == "async_one"
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["rewards/async_one/mean"] == 1.0
    name = trainer.reward_func_names[1]
    # scores = 0.5 * 1.0 + 2.0 * reward model output, averaged over the batch
    assert first["objective/scores"] == pytest.approx(0.5 + 2.0 * first[f"rewards/{name}/mean"], abs=1e-5)
