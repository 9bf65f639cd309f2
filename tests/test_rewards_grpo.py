"""The reward adapters work unchanged in TRL's own GRPOTrainer (tiny model, CPU, two steps)."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_gae_ext.rewards import BleuReward
from trl_gae_ext.tiny import build_tiny_model, build_tokenizer


PROMPTS = ["say red cat", "say blue dog"]
REFERENCES = ["the red cat sat on the mat", "the blue dog sat on the mat"]


def test_grpo_trains_with_bleu_reward(tmp_path):
    # A small vocabulary: random completions share words with the references, so BLEU varies within a group and
    # the group-relative advantages (and the gradient) are non-zero.
    tokenizer = build_tokenizer(PROMPTS + REFERENCES)
    model = build_tiny_model(tokenizer)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4, "reference": REFERENCES * 4, "id": list(range(8))})
    reward = BleuReward()
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()

    step_logs = [log for log in trainer.state.log_history if "rewards/bleu/mean" in log]
    assert len(step_logs) == 2
    assert any(log["rewards/bleu/std"] > 0 for log in step_logs)

    # The rewards TRL logged for the last generation batch are what BleuReward gives for those completions.
    prompts = list(trainer._logs["prompt"])
    completions = list(trainer._logs["completion"])
    logged = list(trainer._logs["rewards"]["bleu"])
    references = [REFERENCES[PROMPTS.index(p)] for p in prompts]
    expected = reward(prompts=prompts, completions=completions, reference=references)
    assert logged == pytest.approx(expected, abs=1e-6)  # float32 in the trainer
    assert step_logs[-1]["rewards/bleu/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)

    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert changed, "no trainable parameter changed"
