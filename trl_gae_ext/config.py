"""`PPOConfig`: the training arguments of `PPOTrainer`.

Field names of the removed `trl.experimental.ppo.PPOConfig` (TRL <= 1.12) keep their meaning, so moving over is a
change of import. One rollout collects `per_device_train_batch_size * gradient_accumulation_steps *
num_mini_batches` episodes per process (TRL 1.12 collected `per_device_train_batch_size *
gradient_accumulation_steps` and split it), then runs `num_ppo_epochs` passes of `num_mini_batches` optimizer steps,
each accumulating `gradient_accumulation_steps` micro-batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


VALUE_HEAD_LAYOUTS = ("auto", "shared", "adapter", "separate")
ADVANTAGE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean")
STOP_TOKENS = ("eos",)
SCORE_SCALES = ("none", "batch", "first")


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"`{name}={value!r}` is not supported. Valid values: {', '.join(map(repr, valid))}.")


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    Configuration for [`PPOTrainer`]: PPO with generalized advantage estimation and a learned critic.

    Only the PPO-specific parameters are listed here; see [`~transformers.TrainingArguments`] for the rest.

    Parameters that control the model:
        model_init_kwargs (`dict` or `str`, *optional*): keyword arguments for `from_pretrained` when `model` (or
            `value_model`) is given as an id or path.
        trainable_layers (`int`, *optional*): train only the last N transformer blocks (and the head) of a
            full-precision policy instead of all weights; an alternative to LoRA.
        logprob_chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk of the lm_head projection and
            log-softmax when log-probs are computed, so the `[B, T, V]` logits never exist; None computes them whole.
        kbit_upcast (`bool`, defaults to `False`): on a 4-bit/8-bit base, cast the unquantized weights
            (embeddings, lm_head, norms) to float32 as peft's `prepare_model_for_kbit_training` does; False keeps them
            in the compute dtype.
        activation_checkpointing (`bool`, *optional*): None (default) turns it on for a 4-bit/8-bit policy and off
            otherwise; an explicit True or False (or the deprecated `gradient_checkpointing`) is kept.

    Parameters that control the rollout (generation):
        max_prompt_length (`int`, *optional*, defaults to `512`): prompts are truncated on the left to this many tokens.
        response_length (`int`, defaults to `53`): maximum number of generated tokens.
        temperature, top_k, top_p, min_p, repetition_penalty: sampling options passed to `generate`.
        stop_token (`"eos"`, *optional*) / stop_token_id (`int`, *optional*): token that ends a response.
        missing_eos_penalty (`float`, *optional*): subtracted from the score of responses without a stop token.
        local_rollout_forward_batch_size (`int`, defaults to `64`): chunk size of the no-grad rollout passes.

    Parameters that control the PPO update:
        num_ppo_epochs, num_mini_batches, cliprange, dual_clip, vf_coef, cliprange_value, entropy_coef,
        loss_aggregation, advantage_level, total_episodes.

    Parameters that control the advantage estimate:
        gamma, lam, lam_critic, lam_adaptive_alpha, bootstrap_truncated, whiten_rewards, whiten_advantages.

    Parameters that control the KL regularisation:
        kl_coef, kl_estimator, kl_in_reward, scale_scores.

    Parameters that control the critic:
        value_head, value_head_type, value_head_dropout, value_head_init_std, value_head_return_scale,
        critic_warmup_steps.

    Parameters that control the rewards:
        reward_weights.

    Parameters that control logging:
        log_completions, num_completions_to_print.
    """

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    save_steps: float = field(
        default=500,
        metadata={
            "help": "Save a checkpoint every X optimizer steps (a ratio of max_steps if < 1). A save due in the middle "
            "of a PPO iteration waits for the iteration's last step, so any value works and resuming is exact."
        },
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={"help": "Restore stateful callbacks (e.g. the adaptive KL coefficient) when resuming."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: every dataset column is passed to the reward functions as a keyword."},
    )

    # Parameters that control the model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when the model is given as an id or a path."},
    )
    trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train only the last N transformer blocks (plus the final norm and head) of a full-precision "
            "policy: the first article's alternative to LoRA. None trains every weight."
        },
    )
    logprob_chunk_size: int | None = field(
        default=512,
        metadata={
            "help": "Tokens per chunk of the lm_head projection + log-softmax in the scoring and training passes, so "
            "the full-vocabulary logits [B, T, V] never exist; None computes them whole. Models whose logits are not "
            "a plain projection of the hidden states (e.g. final-logit softcapping) always use their full logits."
        },
    )
    kbit_upcast: bool = field(
        default=False,
        metadata={
            "help": "On a 4-bit/8-bit base, cast the unquantized weights (embeddings, lm_head, norms) to float32, as "
            "peft's prepare_model_for_kbit_training does. False keeps them in the compute dtype (docs/ppo.md)."
        },
    )

    # Parameters that control the rollout
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Maximum prompt length in tokens; longer prompts are truncated on the left (warned once)."},
    )
    response_length: int = field(default=53, metadata={"help": "Maximum number of generated tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling; None disables it."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability mass."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling; None disables it."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty for generation."})
    stop_token: str | None = field(
        default="eos",
        metadata={"help": "Token that ends a response: 'eos' (the tokenizer's EOS) or None (use `stop_token_id`)."},
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Id of the token that ends a response; mutually exclusive with `stop_token`."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of a response that ends without the stop token (>= 0)."},
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Per-process chunk size of the no-grad generation and scoring passes."}
    )
    generation_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Extra keyword arguments for `generate` (override the sampling options)."}
    )

    # Parameters that control the PPO update
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Total number of episodes (prompts answered); None means num_train_epochs x dataset size."},
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per pass."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range epsilon of the policy ratio."})
    dual_clip: float | None = field(
        default=None,
        metadata={"help": "Dual-clip constant c > 1 bounding the loss of negative advantages (Ye et al. 2020)."},
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float | None = field(
        default=0.2, metadata={"help": "Clip range of the value prediction around the old value; None disables it."}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus in the policy loss."})
    loss_aggregation: str = field(
        default="token_mean",
        metadata={
            "help": "'token_mean' (mean over all valid tokens of the minibatch) or 'seq_mean' (per sequence, then "
            "mean over the minibatch's sequences); the same whatever gradient_accumulation_steps splits it into."
        },
    )
    advantage_level: str = field(
        default="token",
        metadata={
            "help": "'token': per-token GAE and ratio. 'sequence': A(x,y) = R - V(x) with the length-normalised "
            "sequence ratio (the first article's sequence form, ratio as in GSPO)."
        },
    )

    # Parameters that control the advantage estimate
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda of the actor's advantages."})
    lam_critic: float | None = field(
        default=1.0,
        metadata={
            "help": "GAE lambda of the critic's targets (decoupled GAE, VC-PPO/VAPO). 1.0 gives Monte Carlo targets; "
            "None uses `lam` for both, as TRL 1.12 did. The default is measured in docs/learning.md."
        },
    )
    lam_adaptive_alpha: float | None = field(
        default=None,
        metadata={"help": "If set, the actor's lambda is 1 - 1/(alpha x response length) per sequence (VAPO)."},
    )
    bootstrap_truncated: bool = field(
        default=False,
        metadata={"help": "Bootstrap V(s_T) from the critic for responses cut at `response_length` (else V=0)."},
    )
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten the advantages (global statistics)."})

    # Parameters that control the KL regularisation
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient beta of the KL penalty to the reference."})
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator: 'k1', 'k2' or 'k3' (http://joschu.net/blog/kl-approx.html)."},
    )
    kl_in_reward: bool = field(
        default=True,
        metadata={"help": "True: -kl_coef x KL is a per-token reward. False: kl_coef x KL is a loss term instead."},
    )
    scale_scores: str = field(
        default="none",
        metadata={
            "help": "Divide the sequence scores by their standard deviation (over all processes) before the KL "
            "penalty is added, so that `kl_coef` weighs the KL against the scores' spread whatever the reward's "
            "units. 'none': `kl_coef` is in reward units, as in TRL 1.12. 'batch': each rollout's own spread "
            "(GRPO's scale_rewards='batch'; True means this). 'first': the spread of the first rollout whose scores "
            "vary, kept for the run and saved with the critic. Measured in docs/learning.md."
        },
    )

    # Parameters that control the critic
    value_head: str = field(
        default="auto",
        metadata={
            "help": "Critic layout: 'shared' (head on the policy's hidden states), 'adapter' (second LoRA adapter on "
            "the policy's base, needs a peft_config), 'separate' (its own model), or 'auto' ('separate' when a "
            "value_model is given, 'adapter' with a peft_config, else 'separate')."
        },
    )
    value_head_type: str = field(default="linear", metadata={"help": "Value head: 'linear' or 'mlp'."})
    value_head_dropout: float = field(default=0.0, metadata={"help": "Dropout before the value head."})
    value_head_init_std: float | None = field(
        default=0.0,
        metadata={
            "help": "Init std of the value head's output layer; 0 starts it at zero (the untrained critic predicts 0 "
            "everywhere), None uses 1/sqrt(hidden+1), which on a real model's hidden states (norm ~2 sqrt(hidden)) "
            "predicts offsets of +-1-2. Measured in docs/learning.md."
        },
    )
    value_head_return_scale: bool = field(
        default=False,
        metadata={
            "help": "Scale the value head's output by the standard deviation of the first rollout's returns (set "
            "once, saved with the head), so that the critic's Adam steps are sized to the returns rather than to the "
            "reward's units. Off by default: on the demo task it slowed PPO down. Measured in docs/learning.md."
        },
    )
    critic_warmup_steps: int = field(
        default=0, metadata={"help": "Number of PPO iterations (rollouts) at the start that train only the critic."}
    )

    # Parameters that control the rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; None weights them all 1.0."}
    )

    # Parameters that control logging
    log_completions: bool = field(
        default=False, metadata={"help": "Log a table of (prompt, completion, reward) samples every logging step."}
    )
    num_completions_to_print: int | None = field(
        default=4, metadata={"help": "Number of completions printed when `log_completions` is set."}
    )

    def __post_init__(self):
        # neither name given: left None ("auto") for `qlora.resolve_activation_checkpointing` once the policy is loaded
        auto_checkpointing = self.activation_checkpointing is None and self.gradient_checkpointing is None
        super().__post_init__()
        if auto_checkpointing:
            self.activation_checkpointing = self.gradient_checkpointing = None
        _check_choice("value_head", self.value_head, VALUE_HEAD_LAYOUTS)
        _check_choice("advantage_level", self.advantage_level, ADVANTAGE_LEVELS)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        _check_choice("value_head_type", self.value_head_type, ("linear", "mlp"))
        if isinstance(self.scale_scores, bool) or str(self.scale_scores).lower() in ("true", "false"):
            self.scale_scores = "batch" if str(self.scale_scores).lower() == "true" else "none"  # bools: on/off
        _check_choice("scale_scores", self.scale_scores, SCORE_SCALES)
        if self.stop_token is not None:
            _check_choice("stop_token", self.stop_token, STOP_TOKENS)
            if self.stop_token_id is not None:
                raise ValueError("Set either `stop_token='eos'` or `stop_token_id`, not both (use stop_token=None).")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}.")
        if self.lam_critic is not None and not 0.0 <= self.lam_critic <= 1.0:
            raise ValueError(f"`lam_critic` must be in [0, 1] or None, got {self.lam_critic}.")
        if self.lam_adaptive_alpha is not None and self.lam_adaptive_alpha <= 0:
            raise ValueError(f"`lam_adaptive_alpha` must be > 0 (VAPO uses 0.05), got {self.lam_adaptive_alpha}.")
        if self.cliprange <= 0:
            raise ValueError(f"`cliprange` must be > 0, got {self.cliprange}.")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"`dual_clip` must be > 1 (3.0 is usual) or None, got {self.dual_clip}.")
        if self.kl_coef < 0:
            raise ValueError(f"`kl_coef` must be >= 0, got {self.kl_coef}.")
        if not self.kl_in_reward and self.kl_estimator == "k1" and self.kl_coef > 0:
            # d/dtheta of (log pi - log ref) is grad log pi, whose expectation under the sampling policy is 0
            warnings.warn(
                "kl_estimator='k1' with kl_in_reward=False adds a loss whose expected gradient is zero at the first "
                "PPO epoch, so the KL penalty does almost nothing; use kl_estimator='k3' (GRPO's) or 'k2' for a KL "
                "loss, or keep k1 in the reward (kl_in_reward=True).",
                UserWarning,
                stacklevel=2,
            )
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"`missing_eos_penalty` must be >= 0 (it is subtracted), got {self.missing_eos_penalty}.")
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        chunk = self.logprob_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"`logprob_chunk_size` must be a positive int or None, got {chunk!r}.")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"`critic_warmup_steps` must be >= 0, got {self.critic_warmup_steps}.")
        if self.trainable_layers is not None and self.trainable_layers < 0:
            raise ValueError(f"`trainable_layers` must be >= 0 or None, got {self.trainable_layers}.")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"`total_episodes` must be >= 1 or None, got {self.total_episodes}.")
        if self.critic_warmup_steps > 0 and self.ddp_find_unused_parameters is None:
            # the policy gets no gradient during warm-up, which DDP must be told about
            self.ddp_find_unused_parameters = True

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps taken on each rollout batch."""
        return self.num_ppo_epochs * self.num_mini_batches

    @property
    def local_rollout_batch_size(self) -> int:
        """Episodes collected per process in one rollout."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
