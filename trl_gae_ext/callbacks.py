"""Trainer callbacks: the adaptive KL controller, a lambda schedule, and the guards the trainer installs itself.

PPO knobs live on the config: a callback changes `args.kl_coef` or `args.lam` and the trainer reads them at the next
rollout. `PPOTrainer` calls `on_rollout_end(args, state, control, stats=...)` on every callback that defines it, after
each rollout is scored, with that rollout's statistics (`objective/kl` is the mean per-sequence KL).
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, ProgressCallback


logger = logging.getLogger(__name__)


class AdaptiveKLCallback(TrainerCallback, ExportableState):
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_episodes / horizon)

    Args:
        target (`float`): target per-sequence KL (nats). The paper used 6 for stylistic continuation.
        horizon (`int`): number of episodes over which the coefficient may change by a factor of e.
        init_kl_coef (`float`, *optional*): starting coefficient; defaults to `args.kl_coef`.
    """

    def __init__(self, target: float = 6.0, horizon: int = 10000, init_kl_coef: float | None = None):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLCallback needs target > 0 and horizon > 0, got {target}, {horizon}.")
        self.target, self.horizon = target, horizon
        self.kl_coef = init_kl_coef

    def on_train_begin(self, args, state, control, **kwargs):
        if self.kl_coef is None:
            self.kl_coef = args.kl_coef
        if self.kl_coef <= 0:
            raise ValueError("AdaptiveKLCallback needs kl_coef > 0: a zero coefficient can never adapt.")
        args.kl_coef = self.kl_coef  # also restores the adapted value when resuming from a checkpoint

    def on_rollout_end(self, args, state, control, stats=None, **kwargs):
        kl = stats["objective/kl"]
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * stats["episodes"] / self.horizon
        args.kl_coef = self.kl_coef

    def state(self) -> dict:
        return {"args": {"target": self.target, "horizon": self.horizon}, "attributes": {"kl_coef": self.kl_coef}}


class LambdaScheduleCallback(TrainerCallback):
    """Moves the actor's GAE lambda linearly from `start` to `end` over the first `num_iterations` rollouts.

    Typical use: start near 1 (Monte Carlo targets, independent of the untrained critic) and lower lambda as the
    critic improves, trading variance for bias. Read at each rollout, so the change applies from the next one.
    """

    def __init__(self, start: float, end: float, num_iterations: int):
        if not (0 <= start <= 1 and 0 <= end <= 1) or num_iterations < 1:
            raise ValueError("LambdaScheduleCallback needs start, end in [0, 1] and num_iterations >= 1.")
        self.start, self.end, self.num_iterations = start, end, num_iterations

    def value(self, iteration: int) -> float:
        frac = min(iteration / self.num_iterations, 1.0)
        return self.start + frac * (self.end - self.start)

    def on_train_begin(self, args, state, control, **kwargs):
        args.lam = self.value(state.global_step // args.steps_per_rollout)

    def on_rollout_end(self, args, state, control, stats=None, **kwargs):
        args.lam = self.value(stats["iteration"] + 1)


class NonFiniteUpdateGuard(TrainerCallback):
    """Drops an optimizer step whose gradients hold NaN/inf, so a bad batch never reaches the weights.

    Runs after clipping and before `optimizer.step()`; setting every gradient to None makes torch optimizers skip
    the parameters entirely (no moment update either). In DDP the gradients are already all-reduced, so every
    process sees the same non-finite values and skips together.

    It also counts the non-finite micro-batch losses the trainer reports (`count_nonfinite_loss`) between two logs:
    the `Trainer`'s `logging_nan_inf_filter` replaces them in the logged `loss`, so they would go unseen.
    """

    def __init__(self):
        self.skipped = 0
        self.nonfinite_losses = 0

    def count_nonfinite_loss(self) -> None:
        self.nonfinite_losses += 1

    def take_nonfinite_losses(self) -> int:
        """The count since the previous call (one logging window), reset to 0."""
        count, self.nonfinite_losses = self.nonfinite_losses, 0
        return count

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        logger.warning("Non-finite gradient at step %d: the update was skipped.", state.global_step + 1)


class IterationProgressCallback(ProgressCallback):
    """The `Trainer`'s progress bar counted in PPO iterations (rollouts), with the latest score and KL."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            total = math.ceil(state.max_steps / args.steps_per_rollout)
            self.training_bar = tqdm(total=total, desc="PPO iterations", unit="it", dynamic_ncols=True)
            self.training_bar.update(state.global_step // args.steps_per_rollout)  # resumed runs
        self.current_step = state.global_step // args.steps_per_rollout

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step // args.steps_per_rollout
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(done - self.current_step)
        self.current_step = done

    def on_rollout_end(self, args, state, control, stats=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            score, kl = stats["objective/scores"], stats["objective/kl"]
            self.training_bar.set_postfix(score=f"{score:.3g}", kl=f"{kl:.3g}", refresh=False)


class RolloutBoundaryCallback(TrainerCallback):
    """Moves the `Trainer`'s checkpoints and evaluations to the end of the PPO iteration they fall in.

    A checkpoint written in the middle of an iteration cannot be resumed exactly: the rollout being trained on is not
    in it, so the resumed run collects a new one from the half-updated policy. The `Trainer` asks for a save at every
    multiple of `save_steps` (also when given as a ratio of `max_steps`), at epoch ends and at the last step, none of
    which need fall on a multiple of `steps_per_rollout`. Running after `DefaultFlowCallback` (the trainer adds it
    last), this callback holds such a request back until the iteration's last optimizer step, where it is carried
    out: users never have to make `save_steps` a multiple of `num_ppo_epochs x num_mini_batches`. Evaluations are
    held back the same way, so `save_strategy="best"` (which saves right after an evaluation) stays on boundaries.
    The first deferral is logged once.
    """

    def __init__(self):
        self.pending_save = self.pending_evaluate = self.told = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.pending_save = self.pending_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        return self._align(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._align(args, state, control)

    def _align(self, args, state, control):
        step, per_rollout = state.global_step, args.steps_per_rollout
        if step % per_rollout == 0:
            control.should_save |= self.pending_save
            control.should_evaluate |= self.pending_evaluate
            self.pending_save = self.pending_evaluate = False
            return control
        if (control.should_save or control.should_evaluate) and not self.told:
            what = " and ".join(
                n for n, f in (("checkpoint", control.should_save), ("evaluation", control.should_evaluate)) if f
            )
            logger.warning(
                "The %s due at step %d waits for step %d, the end of its PPO iteration (%d optimizer steps each): "
                "checkpoints and evaluations happen between iterations, so that resuming reproduces the run.",
                what,
                step,
                step + per_rollout - step % per_rollout,
                per_rollout,
            )
            self.told = True
        self.pending_save |= control.should_save
        self.pending_evaluate |= control.should_evaluate
        control.should_save = control.should_evaluate = False
        return control
