"""Text-metric rewards for TRL: BLEU, ROUGE, chrF, exact match, token F1 and any `evaluate` module.

Every reward is a TRL reward function, `(prompts, completions, **columns) -> list[float | None]` with a readable
`__name__`, so it works unchanged in `trl_gae_ext.PPOTrainer` and in TRL's `GRPOTrainer` and `RLOOTrainer`. The
reference text comes from a dataset column (`reference` by default; a string or a list of strings).

    from trl_gae_ext.rewards import BleuReward, get_reward
    trainer = GRPOTrainer(model, reward_funcs=[BleuReward(), get_reward("rougeL")], ...)

Importing this package is light: sacrebleu, rouge_score and evaluate are imported on first use.
"""

from .base import MissingColumnError, ReferenceReward
from .evaluate_reward import EvaluateReward, load_metric, packaged_metric_path
from .registry import REWARD_REGISTRY, get_reward
from .shaping import clip_reward, length_penalty, scale_reward
from .text_metrics import BleuReward, ChrFReward, ExactMatchReward, RougeReward, TokenF1Reward


__all__ = [
    "REWARD_REGISTRY",
    "BleuReward",
    "ChrFReward",
    "EvaluateReward",
    "ExactMatchReward",
    "MissingColumnError",
    "ReferenceReward",
    "RougeReward",
    "TokenF1Reward",
    "clip_reward",
    "get_reward",
    "length_penalty",
    "load_metric",
    "packaged_metric_path",
    "scale_reward",
]
