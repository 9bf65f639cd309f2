"""Rollout data: the prompt sampler, response post-processing, and the batch of experience PPO trains on."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils.data import Sampler


class RolloutSampler(Sampler[int]):
    """Yields each global rollout batch of prompt indices `repeats` times in a row.

    The trainer's dataloader then hands the same rollout batch to every micro-step of a PPO iteration, and
    `accelerate` splits each repetition evenly over processes (process p gets the p-th slice). Order depends only on
    `seed` and the epoch, so resuming from a checkpoint replays it exactly.
    """

    def __init__(self, num_samples: int, global_batch_size: int, repeats: int, shuffle: bool = True, seed: int = 0):
        self.num_samples, self.global_batch_size, self.repeats = num_samples, global_batch_size, repeats
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        for start in range(0, self.num_samples - self.global_batch_size + 1, self.global_batch_size):
            chunk = order[start : start + self.global_batch_size]
            for _ in range(self.repeats):
                yield from chunk

    def __len__(self) -> int:
        return (self.num_samples // self.global_batch_size) * self.global_batch_size * self.repeats


def truncate_at_stop(responses: torch.Tensor, stop_token_id: int | None, pad_token_id: int):
    """Cut responses after their first stop token (kept: emitting it is an action) and pad the rest.

    Shape:
        responses: `[B, R]` generated token ids.
        returns `(responses, mask, finished)`: `[B, R]` ids with padding after the stop, `[B, R]` 1 on response
        tokens, `[B]` True where the response ended with the stop token.
    """
    _, r = responses.shape
    positions = torch.arange(r, device=responses.device).expand_as(responses)
    if stop_token_id is None:
        finished = torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)
        mask = torch.ones_like(responses, dtype=torch.long)
        return responses, mask, finished
    is_stop = responses == stop_token_id
    finished = is_stop.any(dim=1)
    first_stop = torch.where(finished, is_stop.float().argmax(dim=1), torch.full_like(finished, r, dtype=torch.long))
    mask = (positions <= first_stop.unsqueeze(1)).long()
    return responses.masked_fill(mask == 0, pad_token_id), mask, finished


@dataclass
class Rollout:
    """One iteration's experience, all tensors `[B, ...]` on the training device.

    Shape:
        input_ids, attention_mask: `[B, P + R]`; response_mask, old_logprobs, ref_logprobs, old_values,
        advantages, returns: `[B, R]`; seq_advantages: `[B]` (sequence-level form only).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    seq_advantages: torch.Tensor | None = None

    def select(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The micro-batch at `indices` as a dict of tensors (what `compute_loss` receives)."""
        batch = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                batch[f.name] = value[indices]
        return batch


def minibatch_plan(
    batch_size: int, num_epochs: int, num_mini_batches: int, micro_batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Indices of every micro-batch of one PPO iteration, in order: each epoch shuffles the rollout batch and cuts
    it into `num_mini_batches` minibatches (one optimizer step each) of micro-batches (gradient accumulation)."""
    plan = []
    for _ in range(num_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, micro_batch_size):
            plan.append(order[start : start + micro_batch_size])
    expected = num_epochs * batch_size // micro_batch_size
    assert len(plan) == expected and batch_size % (num_mini_batches * micro_batch_size) == 0
    return plan


def minibatch_counts(response_mask: torch.Tensor, plan: list[torch.Tensor], micro_batches: int) -> torch.Tensor:
    """Valid tokens and non-empty rows of every minibatch of `plan` (each run of `micro_batches` consecutive
    micro-batches), the normalisers of the minibatch's token and sequence means (`gae.aggregate_loss`).

    Shape:
        response_mask: `[B, R]`; returns `[len(plan) // micro_batches, 2]` float64, columns (tokens, sequences).
    """
    per_row = torch.stack([response_mask.sum(1), (response_mask.sum(1) > 0).to(response_mask.dtype)], dim=1)
    per_micro = torch.stack([per_row[indices].sum(0) for indices in plan]).double()
    return per_micro.view(-1, micro_batches, 2).sum(1)
