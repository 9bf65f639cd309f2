"""The reward adapters work unchanged in TRL's own GRPOTrainer and RLOOTrainer (tiny model, CPU, two steps)."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_gae_ext.rewards import BleuReward, RougeReward
from trl_gae_ext.tiny import build_tiny_model, build_tokenizer


PROMPTS = ["say red cat", "say blue dog"]
REFERENCES = ["the red cat sat on the mat", "the blue dog sat on the mat"]


@pytest.mark.parametrize(
    "config_class, trainer_class, reward",
    [(GRPOConfig, GRPOTrainer, BleuReward()), (RLOOConfig, RLOOTrainer, RougeReward("rouge1"))],
    ids=["grpo-bleu", "rloo-rouge1"],
)
def test_trl_trainer_trains_with_reward(tmp_path, config_class, trainer_class, reward):
    # A small vocabulary: random completions share words with the references, so the reward varies within a
    # group and the group-relative advantages (and the gradient) are non-zero.
    tokenizer = build_tokenizer(PROMPTS + REFERENCES)
    model = build_tiny_model(tokenizer)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4, "reference": REFERENCES * 4, "id": list(range(8))})
    args = config_class(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        beta=0.0,  # no reference model (RLOO would otherwise reload the in-memory model by id)
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    trainer = trainer_class(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()

    name = reward.__name__
    step_logs = [log for log in trainer.state.log_history if f"rewards/{name}/mean" in log]
    assert len(step_logs) == 2
    assert any(log[f"rewards/{name}/std"] > 0 for log in step_logs)

    # The rewards TRL logged for the last generation batch are what the reward gives for those completions.
    prompts = list(trainer._logs["prompt"])
    completions = list(trainer._logs["completion"])
    logged = list(trainer._logs["rewards"][name])
    references = [REFERENCES[PROMPTS.index(p)] for p in prompts]
    expected = reward(prompts=prompts, completions=completions, reference=references)
    assert len(logged) == 4 and logged == pytest.approx(expected, abs=1e-6)  # float32 in the trainer
    assert step_logs[-1][f"rewards/{name}/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)

    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "no trainable parameter changed"
