"""DeepSpeed ZeRO and FSDP: what the trainer does differently when the weights are sharded.

- Copies of the initial policy (the frozen reference, the `separate` critic): ZeRO-3 partitions the weights while
  the policy loads (`zero.Init`), so the policy holds empty shards that `copy.deepcopy` cannot copy. The copies are
  then loaded again from the model's id or path, as TRL's `GRPOTrainer` loads its reference.
- The reference model is prepared as TRL prepares its own: `prepare_deepspeed` (sharded under ZeRO-3, a stage-0
  engine otherwise), `prepare_fsdp`, or `prepare_model(evaluation_mode=True)`.
- Generation: under FSDP2 the `PolicyValueModel` is the root of the sharding, and `policy.generate` is not its
  forward: it runs as one of the root's registered forward methods (`policy_generate`). Under ZeRO-3 DeepSpeed's
  hooks fetch each layer's shard in its forward (TRL's `ds3_gather_for_generation=False`).
- Saving: every saved parameter is gathered under ZeRO-3 (`saving.save_pretrained` refuses empty shards); under FSDP
  the full state dict is written.
- `fsdp=...` that accelerate did not turn on (it enables FSDP only on GPU-like devices) is refused.
"""

from __future__ import annotations

import contextlib
import copy

from accelerate.utils import DistributedType
from torch import nn
from transformers import AutoModelForCausalLM
from trl.trainer.utils import create_model_from_path

from .modeling import is_peft_model


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned `model`'s parameters (each process holds a shard, `numel() == 0`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _loadable_source(policy, model_id: str | None, role: str) -> str:
    source = model_id or getattr(policy.config, "_name_or_path", "")
    if not source:  # a model built from a config
        raise ValueError(
            f"The policy's weights are partitioned by DeepSpeed ZeRO-3, so its {role} cannot be copied from it and is "
            "loaded from the model's id or path instead, but the policy has none: pass `model` as an id or path."
        )
    return source


def copy_policy(policy, model_id: str | None, args, reference: bool, layout: str, value_model):
    """`(ref_model, value_model)`: a frozen copy of the initial policy when `reference`, and the model `build_critic`
    takes the critic's backbone from: the given `value_model`, else, for a `separate` critic, a copy of the policy
    under ZeRO-3 (None otherwise: `build_critic` copies the policy itself).

    Both are taken before PEFT or layer freezing touch the policy. Under ZeRO-3 they are loaded from `model_id`."""
    from .qlora import model_init_kwargs

    partitioned = is_zero3_partitioned(policy)
    ref_model = None
    if reference:
        if partitioned:
            source = _loadable_source(policy, model_id, "reference")
            ref_model = create_model_from_path(source, AutoModelForCausalLM, **model_init_kwargs(args))
        else:
            ref_model = copy.deepcopy(policy)
        ref_model.eval().requires_grad_(False)
    if layout == "separate" and value_model is None and partitioned:
        source = _loadable_source(policy, model_id, "critic")
        value_model = create_model_from_path(source, AutoModelForCausalLM, **model_init_kwargs(args))
    return ref_model, value_model


def prepare_reference(ref_model: nn.Module | None, accelerator):
    """The frozen reference, prepared as TRL's `GRPOTrainer` prepares its own."""
    if ref_model is None:
        return None
    from trl.models import prepare_deepspeed, prepare_fsdp

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return prepare_deepspeed(ref_model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return prepare_fsdp(ref_model, accelerator)
    return accelerator.prepare_model(ref_model, evaluation_mode=True)


def check_sharding(args, accelerator) -> None:
    """Refuse an `fsdp` setting that accelerate did not turn on: the run would be plain data parallel."""
    if args.fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"`fsdp` is set but accelerate runs this job as {accelerator.distributed_type.value}: it turns FSDP on "
            f"only on GPU-like devices (this run is on {accelerator.device.type}), so nothing would be sharded. Drop "
            "`fsdp`/`fsdp_config`, or run on GPUs."
        )


@contextlib.contextmanager
def policy_generate(trainer, model):
    """The policy's `generate`, made safe to call on a sharded model for the block.

    FSDP runs its hooks (lazy init as the root, unshard, reshard) only around the root's forward methods, and the
    `PolicyValueModel` root has no `generate`: under FSDP2 the policy's `generate`, and `reference_logprobs` (which
    calls `forward` directly), are registered as the root's forward methods, as transformers' `Trainer` registers a
    model's own `generate`. FSDP1 gathers the root's parameters with TRL's `summon_full_params(recurse=False)`, as
    `GRPOTrainer` generates. ZeRO-3 needs nothing: its hooks fetch each sub-module's parameters in its forward.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    root = trainer.model_wrapped
    if trainer.is_fsdp_enabled and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
        from trl.distributed import DistributedBackend

        with DistributedBackend(trainer.accelerator).summon_full_params(root, recurse=False):
            yield model.policy.generate
    elif isinstance(root, FSDPModule):  # FSDP2 (`fully_shard`), once the Trainer prepared the model
        if "policy_generate" not in vars(root):
            root.policy_generate = root.policy.generate
            register_fsdp_forward_method(root, "policy_generate")
            register_fsdp_forward_method(root, "reference_logprobs")
        yield root.policy_generate
    else:
        yield model.policy.generate


def saved_parameters(model) -> list[nn.Parameter]:
    """The parameters `saving.save_pretrained` writes: all but a PEFT policy's frozen base and its frozen `ref`
    adapter."""
    if not is_peft_model(model.policy):
        return list(model.parameters())
    policy = {id(p) for p in model.policy.parameters()}
    return [p for p in model.parameters() if p.requires_grad or id(p) not in policy]


@contextlib.contextmanager
def weights_for_saving(trainer):
    """The weights `saving.save_pretrained` writes, whole, for the block (a collective: every process enters it).

    Yields None (write the modules' own tensors) or a full state dict of the `PolicyValueModel` (on the main process).
    ZeRO-3 gathers the saved parameters in place (`GatheredParameters`). FSDP's parameters are shards (DTensors under
    FSDP2): their full state dict, as `Trainer.save_model` takes it under FSDP (accelerate's `get_state_dict`, whose
    FSDP2 branch is `get_model_state_dict`, called here on the model itself)."""
    from torch.distributed.fsdp import FSDPModule

    model, accelerator = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator
    if accelerator.distributed_type == DistributedType.DEEPSPEED and is_zero3_partitioned(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(saved_parameters(model)):
            yield None
    elif isinstance(model, FSDPModule):  # FSDP2: what `get_state_dict` does for it, on the model itself
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        yield get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif trainer.is_fsdp_enabled:
        yield accelerator.get_state_dict(trainer.model_wrapped)
    else:
        yield None
