"""`PPOTrainer`: PPO with GAE and a learned critic, as a `transformers.Trainer`.

One PPO iteration, read top to bottom in `_make_experience` and `compute_loss`:
rollout (generate) -> old log-probs, reference log-probs and values -> rewards -> GAE -> whitening ->
`num_ppo_epochs` x `num_mini_batches` clipped updates of policy and critic.

The `Trainer` loop drives the updates: its dataloader hands the same rollout batch of prompts to every micro-step
of an iteration (`RolloutSampler`), `training_step` collects the experience on the first micro-step, and each
later micro-step trains on its slice. Optimizer, scheduler, gradient accumulation, clipping, checkpoints, logging
and callbacks are the `Trainer`'s own.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict

import torch
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    Trainer,
    enable_full_determinism,
    set_seed,
)
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import HubStrategy
from trl.data_utils import is_conversational, maybe_apply_chat_template
from trl.trainer.utils import identity, pad

from . import distributed, saving
from .callbacks import AdaptiveKLCallback, IterationProgressCallback, NonFiniteUpdateGuard, RolloutBoundaryCallback
from .completions import log_completions
from .config import PPOConfig
from .dropout import disable_dropout
from .gae import (
    adaptive_lambda,
    aggregate_loss,
    compute_decoupled_gae,
    compute_gae,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from .generation import build_generation_config, generating_with
from .modeling import (
    PolicyValueModel,
    adapter_checkpoint_kwargs,
    build_critic,
    freeze_all_but_last_layers,
    is_peft_model,
)
from .qlora import attach_adapters, is_quantized, load_policy, model_init_kwargs
from .rollout import Rollout, RolloutSampler, minibatch_counts, minibatch_plan, truncate_at_stop
from .scoring import RewardScorer, check_reward_columns, load_reward_funcs
from .value_head import fit_return_scale, scaled_scores


logger = logging.getLogger(__name__)


def _check_dataset(dataset, name: str) -> None:
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(f"`{name}` needs a 'prompt' column; its columns are {sorted(columns)}.")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty.")


def _resolve_layout(layout: str, peft_config, value_model, model) -> str:
    if value_model is not None:
        if layout not in ("auto", "separate"):
            raise ValueError(f"Passing `value_model` implies value_head='separate', but value_head={layout!r}.")
        return "separate"
    if layout == "auto":
        return "adapter" if (peft_config is not None or is_peft_model(model)) else "separate"
    if layout == "adapter" and peft_config is None and not is_peft_model(model):
        raise ValueError("value_head='adapter' puts a critic LoRA adapter on the policy's base: pass a `peft_config`.")
    return layout


class PPOTrainer(Trainer):
    """PPO with generalized advantage estimation and a configurable value head.

    Args:
        model (`str` or `PreTrainedModel` or `PeftModel`): the policy, as an id/path (loaded with
            `args.model_init_kwargs`) or a loaded causal LM.
        reward_funcs: what TRL's `GRPOTrainer` accepts: callables `(prompts, completions, **columns) -> list[float]`
            (sync or async), sequence-classification models or model ids; one or a list, weighted by
            `args.reward_weights`.
        args ([`PPOConfig`], *optional*): training configuration.
        train_dataset, eval_dataset: datasets with a `prompt` column (text or conversational); every other column is
            passed to the reward functions.
        processing_class: the policy's tokenizer (loaded from `model` when omitted).
        reward_processing_classes: tokenizers of the reward models (None entries for callables).
        peft_config (`peft.PeftConfig`, *optional*): LoRA configuration of the policy (and of the critic adapter).
        quantization_config (`BitsAndBytesConfig`, *optional*): load `model` quantized (4-bit QLoRA).
        value_model (`str` or `PreTrainedModel`, *optional*): the critic: a sequence-classification model (its
            backbone and `score` head give per-token values) or a base/causal model that gets a `ValueHead`.
            Implies `value_head="separate"`.
        callbacks: `TrainerCallback`s; those defining `on_rollout_end` see each iteration's statistics.
    """

    _tag_names = ["trl", "ppo", "gae", "trl-gae-ext"]
    # `compute_loss` divides every micro-batch's loss by its whole minibatch's counts (see `training_step`), so the
    # `Trainer` must not divide it again by the number of gradient accumulation steps
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        reward_funcs,
        args: PPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class=None,
        reward_processing_classes=None,
        peft_config=None,
        quantization_config=None,
        value_model=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PPOConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-PPO")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"`args` must be a trl_gae_ext.PPOConfig, got {type(args).__name__}.")
        _check_dataset(train_dataset, "train_dataset")
        _check_dataset(eval_dataset, "eval_dataset")
        # the value head and the LoRA adapters are initialised here, before `Trainer.__init__` seeds: seed now, so
        # that `args.seed` alone fixes the run
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)

        model_id = model if isinstance(model, str) else None
        policy = load_policy(model, args, quantization_config)
        # a model that went through another Trainer keeps accelerate's patched `forward` bound to itself: unwrap it,
        # or the reference deepcopy below would call the policy and the KL would always be 0
        policy = extract_model_from_parallel(policy, keep_fp32_wrapper=False)
        tokenizer = processing_class or AutoTokenizer.from_pretrained(model_id or policy.config._name_or_path)
        if tokenizer.pad_token is None:  # as TRL does
            tokenizer.pad_token = tokenizer.eos_token

        funcs, classes, names = load_reward_funcs(reward_funcs, reward_processing_classes, tokenizer)
        if train_dataset is not None and getattr(train_dataset, "column_names", None) is not None:
            check_reward_columns(funcs, names, train_dataset.column_names)
        if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
            raise ValueError(f"Got {len(args.reward_weights)} reward_weights for {len(funcs)} reward functions.")
        self.reward_func_names = names
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(funcs), dtype=torch.float32)

        layout = _resolve_layout(args.value_head, peft_config, value_model, policy)
        if isinstance(value_model, str):
            value_model = AutoModelForSequenceClassification.from_pretrained(
                value_model, num_labels=1, **model_init_kwargs(args)
            )
        if layout == "adapter" and args.gradient_checkpointing:
            adapter_checkpoint_kwargs(policy, args.gradient_checkpointing_kwargs)  # refuses reentrant checkpointing
        uses_peft = peft_config is not None or is_peft_model(policy)
        needs_ref = args.kl_coef > 0 or any(isinstance(cb, AdaptiveKLCallback) for cb in callbacks or [])
        # the reference is the initial policy: a frozen `ref` adapter for PEFT, a frozen copy of the model otherwise
        needs_ref_copy = needs_ref and not uses_peft
        if needs_ref_copy and is_quantized(policy):
            raise ValueError(
                "A quantized policy needs a `peft_config`: its reference is a frozen copy of the adapter."
            )
        # copies of the initial policy (reference, separate critic) are taken before PEFT or freezing touch it
        ref_model, value_model = distributed.copy_policy(policy, model_id, args, needs_ref_copy, layout, value_model)
        critic, head = build_critic(policy, value_model, layout, args)
        if args.trainable_layers is not None:
            if peft_config is not None or is_quantized(policy):
                raise ValueError("`trainable_layers` is for full-precision training; drop it or the peft_config.")
            freeze_all_but_last_layers(policy, args.trainable_layers)
        if uses_peft:
            policy = attach_adapters(policy, peft_config, with_critic=layout == "adapter", with_reference=needs_ref)
        for m in (policy, critic, ref_model):
            if m is not None:
                disable_dropout(m)  # the first PPO epoch must see ratio == 1
        wrapper = PolicyValueModel(policy, head, layout, critic, args.logprob_chunk_size)

        super().__init__(
            model=wrapper,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        distributed.check_sharding(args, self.accelerator)
        self.ref_model = distributed.prepare_reference(ref_model, self.accelerator)
        self.scorer = RewardScorer(funcs, classes, names).to(self.accelerator.device)
        self.stop_token_id = tokenizer.eos_token_id if args.stop_token == "eos" else args.stop_token_id
        self.generation_config = self._generation_config(tokenizer, sampling=True)
        self.nonfinite_guard = NonFiniteUpdateGuard()
        self.add_callback(self.nonfinite_guard)
        if not args.disable_tqdm:  # count the bar in PPO iterations rather than optimizer steps
            self.remove_callback(ProgressCallback)
            self.add_callback(IterationProgressCallback)

        self.global_rollout_batch_size = args.local_rollout_batch_size * self.accelerator.num_processes
        if train_dataset is not None and hasattr(train_dataset, "__len__"):
            if len(train_dataset) < self.global_rollout_batch_size:
                raise ValueError(
                    f"train_dataset has {len(train_dataset)} prompts, fewer than one rollout batch "
                    f"({self.global_rollout_batch_size} = per_device_train_batch_size x gradient_accumulation_steps x "
                    "num_mini_batches x processes). Add prompts or lower those settings."
                )
        if args.total_episodes is not None:
            iterations = math.ceil(args.total_episodes / self.global_rollout_batch_size)
            args.max_steps = iterations * args.steps_per_rollout
        elif args.max_steps > 0 and args.max_steps % args.steps_per_rollout:
            # a run that stops mid-iteration would end on a checkpoint that cannot be resumed exactly
            rounded = math.ceil(args.max_steps / args.steps_per_rollout) * args.steps_per_rollout
            logger.warning(
                "max_steps=%d is rounded up to %d, a whole number of PPO iterations (%d optimizer steps each).",
                args.max_steps,
                rounded,
                args.steps_per_rollout,
            )
            args.max_steps = rounded
        # checkpoints and evaluations wait for the end of their PPO iteration (after DefaultFlowCallback asks for them)
        self.add_callback(RolloutBoundaryCallback())
        self._micro_steps_per_rollout = args.steps_per_rollout * args.gradient_accumulation_steps
        self._micro_step = 0
        self._rollout: Rollout | None = None
        self._plan: list[torch.Tensor] = []
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._samples: dict[str, list] | None = None
        self._warned_prompt_truncation = False
        self._episodes = 0
        logger.info(
            "PPOTrainer: value_head=%s, %s trainable / %s total parameters.",
            layout,
            f"{sum(p.numel() for p in wrapper.parameters() if p.requires_grad):,}",
            f"{sum(p.numel() for p in wrapper.parameters()):,}",
        )

    # -- data ------------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("PPOTrainer needs a `train_dataset` with a 'prompt' column to train.")
        sampler = RolloutSampler(
            len(self.train_dataset),
            self.global_rollout_batch_size,
            repeats=self._micro_steps_per_rollout,
            seed=self.args.seed,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_size=self.args.local_rollout_batch_size,
            sampler=sampler,
            collate_fn=identity,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def _generation_config(self, tokenizer, sampling: bool) -> GenerationConfig:
        return build_generation_config(self.args, tokenizer, self.stop_token_id, sampling)

    def _tokenize_prompts(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        conversational = is_conversational({"prompt": prompts[0]})
        texts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
        enc = self.processing_class(
            texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=not conversational
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        limit = self.args.max_prompt_length
        if limit is not None and ids.shape[1] > limit:
            if not self._warned_prompt_truncation and int(mask.sum(1).max()) > limit:
                logger.warning("Prompts longer than max_prompt_length=%d are truncated on the left.", limit)
                self._warned_prompt_truncation = True
            ids, mask = ids[:, -limit:], mask[:, -limit:]
        device = self.accelerator.device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def _generate(self, model: PolicyValueModel, prompt_ids, prompt_mask, config) -> torch.Tensor:
        """Sampled responses `[B, R]` (right-padded), generated in chunks with the KV cache, as `config` alone says."""
        chunk = self.args.local_rollout_forward_batch_size
        responses = []
        with distributed.policy_generate(self, model) as generate, generating_with(model.policy, config):
            for i in range(0, prompt_ids.shape[0], chunk):
                seq = generate(
                    input_ids=prompt_ids[i : i + chunk],
                    attention_mask=prompt_mask[i : i + chunk],
                    generation_config=config,
                )
                responses.extend(seq[:, prompt_ids.shape[1] :])
        return pad(responses, padding_value=self.processing_class.pad_token_id, padding_side="right")

    # -- one PPO iteration: experience -----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        k = self._micro_step % self._micro_steps_per_rollout
        if k == 0 or self._rollout is None:
            self._rollout = self._make_experience(inputs)
            k = 0
            # Each micro-batch's loss is normalised by its minibatch's token / sequence counts, so the accumulated
            # gradient is the minibatch's mean however it is split. Averaged over processes: DDP averages gradients,
            # so each process dividing by the mean count gives the token mean over every process's minibatch.
            counts = minibatch_counts(self._rollout.response_mask, self._plan, self.args.gradient_accumulation_steps)
            self._minibatch_counts = self.accelerator.reduce(counts, reduction="mean").tolist()
        batch = self._rollout.select(self._plan[k])
        batch["minibatch_tokens"], batch["minibatch_seqs"] = self._minibatch_counts[
            k // self.args.gradient_accumulation_steps
        ]
        self._micro_step = (k + 1) % self._micro_steps_per_rollout
        return super().training_step(model, batch, num_items_in_batch)

    @torch.no_grad()
    def _make_experience(self, examples: list[dict]) -> Rollout:
        args, device = self.args, self.accelerator.device
        start = time.perf_counter()
        iteration = self.state.global_step // args.steps_per_rollout
        wrapper: PolicyValueModel = self.accelerator.unwrap_model(self.model)
        wrapper.eval()

        # 1. rollout
        prompts = [ex["prompt"] for ex in examples]
        columns = {key: [ex[key] for ex in examples] for key in examples[0] if key != "prompt"}
        prompt_ids, prompt_mask = self._tokenize_prompts(prompts)
        responses = self._generate(wrapper, prompt_ids, prompt_mask, self.generation_config)
        responses, mask, finished = truncate_at_stop(responses, self.stop_token_id, self.processing_class.pad_token_id)
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        gen_time = time.perf_counter() - start

        # 2. old log-probs, values (V(s_0) .. V(s_R)), reference log-probs
        logprobs, values, ref_logprobs = self._score_tokens(wrapper, input_ids, attention_mask, responses.shape[1])

        # 3. sequence scores from the reward functions
        scores, per_func, completions = self._score_completions(prompts, responses, mask, columns)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~finished).float()

        # 4. per-token rewards: score (in units of its spread) on the last response token, -beta * KL on every token
        mask_f = mask.float()
        kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * mask_f if ref_logprobs is not None else None
        non_score = -args.kl_coef * kl if (kl is not None and args.kl_in_reward) else torch.zeros_like(mask_f)
        lengths = mask.sum(1)
        rewards = non_score.clone()
        rewards[torch.arange(len(scores), device=device), lengths - 1] += scaled_scores(
            scores, args.scale_scores, wrapper, self._global_moments
        )
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask_f, shift_mean=False, **self._global_moments(rewards, mask_f))

        if args.value_head_return_scale:  # once, at the first rollout: values computed before it are rescaled
            values = values * fit_return_scale(wrapper.value_head, rewards, mask_f, args.gamma, self._global_moments)

        # 5. GAE: advantages for the actor, returns (critic targets) for the critic
        last_values = values[:, -1] * (~finished).float() if args.bootstrap_truncated else None
        values = values[:, :-1] * mask_f
        lam = adaptive_lambda(lengths, args.lam_adaptive_alpha) if args.lam_adaptive_alpha else args.lam
        lam_critic = args.lam if args.lam_critic is None else args.lam_critic
        if args.lam_adaptive_alpha is None and lam_critic == lam:
            advantages, returns = compute_gae(rewards, values, mask_f, args.gamma, lam, last_values)
        else:
            advantages, returns = compute_decoupled_gae(
                rewards, values, mask_f, args.gamma, lam, lam_critic, last_values
            )
        seq_advantages = None
        if args.advantage_level == "sequence":
            # the first article's sequence form A(x, y) = R - V(x): Monte Carlo return minus the prompt's value
            seq_advantages = compute_gae(rewards, values, mask_f, args.gamma, 1.0, last_values)[0][:, 0]
            if args.whiten_advantages:
                ones = torch.ones_like(seq_advantages)
                seq_advantages = masked_whiten(seq_advantages, ones, **self._global_moments(seq_advantages, ones))
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask_f, **self._global_moments(advantages, mask_f))

        rollout = Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=mask,
            old_logprobs=logprobs,
            old_values=values,
            advantages=advantages,
            returns=returns,
            ref_logprobs=ref_logprobs if not args.kl_in_reward else None,
            seq_advantages=seq_advantages,
        )
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + iteration * 7919 + self.args.process_index)
        self._plan = minibatch_plan(
            len(prompts), args.num_ppo_epochs, args.num_mini_batches, args.per_device_train_batch_size, generator
        )
        wrapper.train()

        # 6. statistics, callbacks, completions sample
        elapsed = time.perf_counter() - start
        stats = self._rollout_stats(
            scores,
            per_func,
            kl,
            non_score,
            logprobs,
            mask_f,
            values,
            returns,
            advantages,
            finished,
            gen_time,
            elapsed,
        )
        stats["iteration"] = iteration
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "on_rollout_end"):
                callback.on_rollout_end(self.args, self.state, self.control, stats=stats)
        if args.log_completions:
            self._samples = {"prompt": prompts, "completion": completions, "scores": scores.tolist()}
        return rollout

    def _score_tokens(self, wrapper: PolicyValueModel, input_ids, attention_mask, r: int):
        """Old log-probs `[B, R]`, values `[B, R + 1]` and reference log-probs `[B, R]` (None when unused)."""
        args = self.args
        need_ref = args.kl_coef > 0 and (self.ref_model is not None or wrapper.has_reference_adapter)
        chunk = args.local_rollout_forward_batch_size
        logprobs, values, ref = [], [], []
        for i in range(0, input_ids.shape[0], chunk):
            ids, am = input_ids[i : i + chunk], attention_mask[i : i + chunk]
            out = wrapper(ids, am, r, temperature=args.temperature, values_past_end=True)
            logprobs.append(out["logprobs"])
            values.append(out["values"])
            if need_ref:
                ref.append(wrapper.reference_logprobs(ids, am, r, args.temperature, ref_model=self.ref_model))
        return torch.cat(logprobs), torch.cat(values), (torch.cat(ref) if need_ref else None)

    def _score_completions(self, prompts, responses, mask, columns):
        texts = self.processing_class.batch_decode(responses, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        completion_ids = [row[m.bool()].tolist() for row, m in zip(responses, mask)]
        extras = {"trainer_state": self.state, "log_metric": self._log_reward_metric, "log_extra": lambda *a: None}
        per_func = self.scorer(prompts, completions, completion_ids, columns, extras).to(self.accelerator.device)
        skipped = torch.isnan(per_func).all(dim=1)
        if skipped.any():
            logger.warning("Every reward function skipped %d completion(s); their score is 0.", int(skipped.sum()))
        scores = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        return scores, per_func, completions

    def _log_reward_metric(self, name: str, value: float) -> None:
        self._metrics[name].append(float(value))

    def _global_moments(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean and unbiased variance of `x` over `mask` across all processes (two passes, float64)."""
        x64, m64 = x.double(), mask.double()
        total = self.accelerator.reduce(torch.stack([(x64 * m64).sum(), m64.sum()]), reduction="sum")
        mean = total[0] / total[1]
        sq = self.accelerator.reduce(((x64 - mean) ** 2 * m64).sum(), reduction="sum")
        var = sq / (total[1] - 1).clamp(min=1)
        return {"mean": mean.to(x.dtype), "var": var.to(x.dtype)}

    def _rollout_stats(
        self, scores, per_func, kl, non_score, logprobs, mask, values, returns, advantages, finished, t_gen, t_all
    ) -> dict[str, float]:
        n = torch.tensor(float(len(scores)), device=scores.device)
        local = {
            "objective/scores": scores.mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
            "objective/entropy": (-logprobs * mask).sum(1).mean(),
            "val/num_eos_tokens": finished.sum().float(),
            "val/explained_var": explained_variance(values, returns, mask),
            "val/value_mean": masked_mean(values, mask),
            "val/returns_mean": masked_mean(returns, mask),
            "adv/mean": masked_mean(advantages, mask),
            "adv/std": masked_mean(advantages**2, mask).sqrt(),
            "val/response_length": mask.sum(1).mean(),
        }
        if kl is not None:
            local["objective/kl"] = kl.sum(1).mean()
        for i, name in enumerate(self.reward_func_names):
            col = per_func[:, i]
            ok = ~torch.isnan(col)
            local[f"rewards/{name}/mean"] = col[ok].mean() if ok.any() else torch.zeros(())
            local[f"rewards/{name}/std"] = col[ok].std() if ok.sum() > 1 else torch.zeros(())
        names = sorted(local)
        device = self.accelerator.device
        vector = torch.stack([local[k].detach().float().to(device).nan_to_num(0.0) for k in names])
        stats = dict(zip(names, self.accelerator.reduce(vector, reduction="mean").tolist()))
        stats.setdefault("objective/kl", 0.0)
        if (scale := self.accelerator.unwrap_model(self.model).score_scale) is not None:  # scale_scores="first"
            stats["objective/score_scale"] = scale
        episodes = int(self.accelerator.reduce(n, reduction="sum").item())
        # derived from the step so that it survives a resume
        self._episodes = (self.state.global_step // self.args.steps_per_rollout + 1) * episodes
        gen_tokens = self.accelerator.reduce(mask.sum().float(), reduction="sum").item()
        stats.update(
            {
                "episodes": episodes,
                "episode": self._episodes,
                "kl_coef": self.args.kl_coef,
                "lam": self.args.lam,
                "time/rollout_s": t_all,
                "time/generation_s": t_gen,
                "rollout/tokens_per_s": gen_tokens / max(t_gen, 1e-9),
            }
        )
        for key, value in stats.items():
            if key not in ("episodes", "episode"):  # `log` reports the latest `episode`, not a window mean
                self._metrics[key].append(float(value))
        return stats

    # -- one PPO iteration: updates --------------------------------------------------------------------------------
    def _in_critic_warmup(self) -> bool:
        return self.state.global_step // self.args.steps_per_rollout < self.args.critic_warmup_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        warmup = self._in_critic_warmup()
        mask = inputs["response_mask"].float()
        # the minibatch's counts (`training_step`): this micro-batch's terms are its share of the minibatch's means;
        # without them (a lone batch) they are the batch's own means
        norm = {"num_tokens": inputs.get("minibatch_tokens"), "num_seqs": inputs.get("minibatch_seqs")}
        # a share x the micro-batches per minibatch, averaged over the micro-steps, logs the minibatch means
        to_mean = args.gradient_accumulation_steps if norm["num_tokens"] is not None else 1
        out = model(
            inputs["input_ids"],
            inputs["attention_mask"],
            num_response_tokens=mask.shape[1],
            temperature=args.temperature,
            compute_policy=not warmup,
            compute_entropy=not warmup,
            train_policy=not warmup,  # the shared layout's backbone is the policy
            entropy_grad=args.entropy_coef != 0,
        )
        vf = value_loss(out["values"], inputs["old_values"], inputs["returns"], mask, args.cliprange_value, **norm)
        loss = args.vf_coef * vf.loss
        self._record({"loss/value_avg": vf.loss * to_mean, "val/clipfrac_avg": vf.clipfrac})
        if not warmup:
            if args.advantage_level == "sequence":
                pg = policy_loss(
                    out["logprobs"], inputs["old_logprobs"], inputs["seq_advantages"], mask, args.cliprange,
                    args.dual_clip, ratio_level="sequence", **norm,
                )  # fmt: skip
            else:
                pg = policy_loss(
                    out["logprobs"], inputs["old_logprobs"], inputs["advantages"], mask, args.cliprange,
                    args.dual_clip, ratio_level="token", loss_aggregation=args.loss_aggregation, **norm,
                )  # fmt: skip
            entropy = aggregate_loss(out["entropy"], mask, num_tokens=norm["num_tokens"])
            loss = loss + pg.loss - args.entropy_coef * entropy
            if not args.kl_in_reward and "ref_logprobs" in inputs and args.kl_coef > 0:
                kl_t = kl_penalty(out["logprobs"], inputs["ref_logprobs"], args.kl_estimator)
                kl = aggregate_loss(kl_t, mask, num_tokens=norm["num_tokens"])
                loss = loss + args.kl_coef * kl
                self._record({"loss/kl_avg": kl * to_mean})
            self._record(
                {
                    "loss/policy_avg": pg.loss * to_mean,
                    "policy/approxkl_avg": pg.approx_kl,
                    "policy/clipfrac_avg": pg.clipfrac,
                    "policy/entropy_avg": entropy * to_mean,
                    "val/ratio": pg.ratio_mean,
                    "val/ratio_var": pg.ratio_var,
                }
            )
        if not torch.isfinite(loss):  # counted by the guard as `ppo/skipped_updates`
            self.nonfinite_guard.count_nonfinite_loss()
            logger.warning("Non-finite PPO loss at step %d; the update will be skipped.", self.state.global_step)
        return (loss, out) if return_outputs else loss

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._metrics[key].append(float(value.detach()))

    # -- logging, evaluation, saving -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and self.model.training:
            names = sorted(self._metrics)
            local = torch.tensor(
                [sum(self._metrics[k]) / len(self._metrics[k]) for k in names],
                dtype=torch.float64,
                device=self.accelerator.device,
            )
            logs.update(zip(names, self.accelerator.reduce(local, reduction="mean").tolist()))
            self._metrics.clear()
            nonfinite = torch.tensor(
                float(self.nonfinite_guard.take_nonfinite_losses()), device=self.accelerator.device
            )
            logs["nonfinite/loss"] = int(self.accelerator.reduce(nonfinite, reduction="sum").item())
            logs["ppo/skipped_updates"] = self.nonfinite_guard.skipped
            logs["episode"] = self._episodes
        super().log(logs, start_time)
        if self._samples is not None and self.accelerator.is_main_process and self.args.log_completions:
            log_completions(self.args, self.state.global_step, self._samples)  # printed, and a wandb/trackio table
            self._samples = None

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy completions for the evaluation prompts, scored by every reward function: logs and returns
        `<prefix>_reward` (weighted sum) and `<prefix>_rewards/<name>/mean`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset with a 'prompt' column.")
        _check_dataset(dataset, "eval_dataset")
        wrapper: PolicyValueModel = self.accelerator.unwrap_model(self.model)
        was_training = wrapper.training
        wrapper.eval()
        config = self._generation_config(self.processing_class, sampling=False)
        rows = list(range(len(dataset)))
        totals = torch.zeros(len(self.reward_func_names) + 1, dtype=torch.float64, device=self.accelerator.device)
        counts = torch.zeros_like(totals)
        with self.accelerator.split_between_processes(rows) as mine:
            for i in range(0, len(mine), self.args.local_rollout_forward_batch_size):
                examples = [dataset[j] for j in mine[i : i + self.args.local_rollout_forward_batch_size]]
                prompts = [ex["prompt"] for ex in examples]
                columns = {key: [ex[key] for ex in examples] for key in examples[0] if key != "prompt"}
                ids, am = self._tokenize_prompts(prompts)
                responses = self._generate(wrapper, ids, am, config)
                responses, mask, _ = truncate_at_stop(
                    responses, self.stop_token_id, self.processing_class.pad_token_id
                )
                scores, per_func, _ = self._score_completions(prompts, responses, mask, columns)
                values = torch.cat([scores.unsqueeze(1), per_func], dim=1).double()
                totals += values.nan_to_num(0.0).sum(0)
                counts += (~torch.isnan(values)).sum(0)
        totals = self.accelerator.reduce(totals, reduction="sum")
        counts = self.accelerator.reduce(counts, reduction="sum")
        means = (totals / counts.clamp(min=1)).tolist()
        metrics = {f"{metric_key_prefix}_reward": means[0]}
        for name, value in zip(self.reward_func_names, means[1:]):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = value
        wrapper.train(was_training)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy at `output_dir` (a PEFT adapter for `AutoPeftModelForCausalLM`, or a full model for
        `AutoModelForCausalLM`), the critic under `critic/` (reloaded with `load_critic`) and a model card
        (`README.md`). Checkpoints (`_internal_call`) hold the same folder. Pushes to the Hub when
        `args.push_to_hub` and called by the user, as `Trainer.save_model` does."""
        output_dir = output_dir or self.args.output_dir
        wrapper: PolicyValueModel = self.accelerator.unwrap_model(self.model)
        with distributed.weights_for_saving(self) as state_dict:
            if self.args.should_save:
                saving.save_pretrained(wrapper, output_dir, state_dict)
                self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
                saving.write_model_card(saving.trainer_model_card(self), wrapper.policy, output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def load_critic(self, input_dir: str) -> None:
        """Load the critic that `save_model` wrote to `input_dir/critic/`, to continue training from a saved model.
        The trainer must have the same critic layout and head (`value_head*` settings, or the same `value_model`
        architecture); the policy comes from the `model` argument (the saved folder itself)."""
        saving.load_critic(self.accelerator.unwrap_model(self.model), input_dir)

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write TRL's model card, with the PPO/GAE settings, to `args.output_dir/README.md` (called by
        `push_to_hub`, which passes its extra keyword arguments here)."""
        if self.is_world_process_zero():
            card = saving.trainer_model_card(self, model_name, dataset_name, [tags] if isinstance(tags, str) else tags)
            saving.write_model_card(card, self.accelerator.unwrap_model(self.model).policy, self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # the weights are in the ordinary layout `save_model` writes, not in a `PolicyValueModel` state dict
        saving.load_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("Loading the best model from %s.", self.state.best_model_checkpoint)
        saving.load_checkpoint(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The `Trainer` copies the top-level weight files of the checkpoint to `output_dir` and uploads that folder;
        # the critic and the model card are copied here, under the same conditions, so each push is complete.
        args = self.args
        in_progress = getattr(self, "push_in_progress", None)
        skipped = not args.hub_always_push and in_progress is not None and not in_progress.is_done()
        if self.is_world_process_zero() and args.hub_strategy != HubStrategy.END and not skipped:
            saving.copy_critic_and_card(checkpoint_folder, args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)
