"""What `PPOTrainer.save_model` writes, and what every `checkpoint-N` holds: a folder the ecosystem loads.

```
dir/
  adapter_config.json, adapter_model.safetensors     a PEFT policy: its own adapter only (AutoPeftModelForCausalLM)
  config.json, generation_config.json, model.safetensors   a full policy, instead (AutoModelForCausalLM)
  README.md                                           model card (TRL's template, PPO/GAE settings, citations)
  tokenizer files, training_args.bin
  critic/
    critic_layout.json                                {"layout": ..., "head": ..., "score_scale": (if fitted)}
    value_head.safetensors, value_head_config.json    a `ValueHead` (`ValueHead.from_pretrained` reads it)
    score_head.safetensors                            a sequence classifier's `score` layer (`ScoreHead`), instead
    adapter_config.json, adapter_model.safetensors    layout "adapter": the `critic` LoRA adapter
    config.json, model.safetensors                    layout "separate": the critic backbone (AutoModel)
```
A checkpoint adds the `Trainer`'s `optimizer.pt`, `scheduler.pt`, `rng_state.pth` and `trainer_state.json`, and
`load_checkpoint` reads the weights back in place for `train(resume_from_checkpoint=...)`. Other PEFT adapters on
the policy's base (a frozen `ref` copy of the initial policy adapter) are never written: they are rebuilt from the
model the trainer is given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import safetensors.torch
import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl.trainer.utils import generate_model_card, get_comet_experiment_url, get_trackio_space_url

from .distributed import saved_parameters
from .modeling import CRITIC_ADAPTER, CRITIC_DIR, is_peft_model
from .value_head import VALUE_HEAD_WEIGHTS_NAME, ValueHead


logger = logging.getLogger(__name__)

CRITIC_MANIFEST_NAME = "critic_layout.json"
SCORE_HEAD_WEIGHTS_NAME = "score_head.safetensors"
LEGACY_VALUE_HEAD_NAME = "value_head.pt"  # written by 0.1.0 (torch.save)
# PEFT writes a non-default adapter into a subfolder named after it: the critic adapter lands in `critic/` itself
assert CRITIC_DIR == CRITIC_ADAPTER

PAPERS = {
    "ppo": ("Proximal Policy Optimization Algorithms", "1707.06347"),
    "gae": ("High-Dimensional Continuous Control Using Generalized Advantage Estimation", "1506.02438"),
}
CITATION = """\
@article{schulman2017proximal,
    title        = {{Proximal Policy Optimization Algorithms}},
    author       = {John Schulman and Filip Wolski and Prafulla Dhariwal and Alec Radford and Oleg Klimov},
    year         = 2017,
    eprint       = {arXiv:1707.06347},
}

@article{schulman2016high,
    title        = {{High-Dimensional Continuous Control Using Generalized Advantage Estimation}},
    author       = {John Schulman and Philipp Moritz and Sergey Levine and Michael Jordan and Pieter Abbeel},
    year         = 2016,
    booktitle    = {4th International Conference on Learning Representations, {ICLR} 2016},
    eprint       = {arXiv:1506.02438},
}"""
# the settings a reader needs to reproduce the PPO/GAE run, in the model card's order
CARD_SETTINGS = (
    "gamma", "lam", "lam_critic", "lam_adaptive_alpha", "bootstrap_truncated", "advantage_level", "whiten_rewards",
    "whiten_advantages", "num_ppo_epochs", "num_mini_batches", "cliprange", "dual_clip", "cliprange_value",
    "vf_coef", "entropy_coef", "loss_aggregation", "kl_coef", "kl_estimator", "kl_in_reward", "scale_scores",
    "value_head_type", "value_head_init_std", "value_head_return_scale", "critic_warmup_steps", "response_length",
    "temperature", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "total_episodes",
    "seed",
)  # fmt: skip


def policy_adapter(policy) -> str:
    """The name of the policy's own PEFT adapter: the active one outside the critic/reference passes."""
    name = policy.active_adapter
    if not isinstance(name, str):
        raise ValueError(f"The policy must have one active adapter (its own) when saving; active: {name}.")
    return name


# -- writing ---------------------------------------------------------------------------------------------------------
def save_pretrained(model, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` (a `PolicyValueModel`) in the layout above: policy at the top, critic in `critic/`.

    `state_dict`: the full weights of `model` (its own keys) when its parameters are shards (FSDP), written instead of
    the modules' own tensors."""
    empty = sum(p.numel() == 0 for p in saved_parameters(model)) if state_dict is None else 0
    if empty:  # ZeRO-3 shards: the files would hold empty tensors that load as nothing
        raise RuntimeError(
            f"{empty} of the parameters to save are empty on this process (DeepSpeed ZeRO-3 partitions them): save "
            "with `PPOTrainer.save_model`, which gathers them, or inside `deepspeed.zero.GatheredParameters`."
        )

    def weights(prefix: str) -> dict:  # `save_pretrained` kwargs: the sub-module's part of `state_dict`, if given
        if state_dict is None:
            return {}
        return {"state_dict": {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}}

    os.makedirs(output_dir, exist_ok=True)
    policy = model.policy
    if is_peft_model(policy):
        name = policy_adapter(policy)
        policy.save_pretrained(output_dir, selected_adapters=[name], **weights("policy."))
        if name != "default":  # PEFT wrote it into `output_dir/<name>/`: the policy belongs at the top
            for file in os.listdir(os.path.join(output_dir, name)):
                os.replace(os.path.join(output_dir, name, file), os.path.join(output_dir, file))
            os.rmdir(os.path.join(output_dir, name))
    else:
        policy.save_pretrained(output_dir, **weights("policy."))
    critic_dir = os.path.join(output_dir, CRITIC_DIR)
    os.makedirs(critic_dir, exist_ok=True)
    if model.layout == "adapter":
        policy.save_pretrained(output_dir, selected_adapters=[CRITIC_ADAPTER], **weights("policy."))
    elif model.layout == "separate":
        model.critic.save_pretrained(critic_dir, **weights("critic."))
    head = model.value_head
    if isinstance(head, ValueHead):
        if state_dict is not None:  # a whole copy of the head, to write with its own `save_pretrained`
            head = ValueHead(**head.config)
            head.load_state_dict(weights("value_head.")["state_dict"])
        head.save_pretrained(critic_dir)
    else:  # a sequence classifier's `score` layer: its shape comes from the `value_model` the trainer is given
        state = weights("value_head.").get("state_dict") or head.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        safetensors.torch.save_file(state, os.path.join(critic_dir, SCORE_HEAD_WEIGHTS_NAME), {"format": "pt"})
    manifest = {"layout": model.layout, "head": type(head).__name__}
    if getattr(model, "score_scale", None) is not None:  # `scale_scores="first"`: the units of the critic's values
        manifest["score_scale"] = model.score_scale
    with open(os.path.join(critic_dir, CRITIC_MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


# -- reading back in place ---------------------------------------------------------------------------------------------
def load_critic(model, input_dir: str) -> None:
    """Load the critic saved in `input_dir/critic/` into `model`, a `PolicyValueModel` with the same layout and head
    (build the trainer with the same `value_head*` settings, or `value_model`), e.g. to continue training."""
    critic_dir = os.path.join(input_dir, CRITIC_DIR)
    with open(os.path.join(critic_dir, CRITIC_MANIFEST_NAME), encoding="utf-8") as f:
        manifest = json.load(f)
    head_type = type(model.value_head).__name__
    if (manifest["layout"], manifest["head"]) != (model.layout, head_type):
        raise ValueError(
            f"{critic_dir} holds a {manifest['layout']!r} critic with a {manifest['head']}, but this trainer's critic "
            f"is {model.layout!r} with a {head_type}: build it with the same `value_head` (and `value_model`)."
        )
    _load_head(model.value_head, critic_dir)
    if "score_scale" in manifest:
        model.score_scale = manifest["score_scale"]
    if model.layout == "adapter":
        _load_adapter(model.policy, critic_dir, CRITIC_ADAPTER)
    elif model.layout == "separate":
        load_weights_in_place(model.critic, critic_dir)


def load_checkpoint(model, checkpoint_dir: str) -> None:
    """Load policy and critic weights of a folder written by `save_pretrained` into `model`, in place (the optimizer
    keeps its parameters), for `train(resume_from_checkpoint=...)`."""
    if not os.path.isfile(os.path.join(checkpoint_dir, CRITIC_DIR, CRITIC_MANIFEST_NAME)):
        return _load_legacy_checkpoint(model, checkpoint_dir)
    if is_peft_model(model.policy):
        _load_adapter(model.policy, checkpoint_dir, policy_adapter(model.policy))
    else:
        load_weights_in_place(model.policy, checkpoint_dir)
    load_critic(model, checkpoint_dir)


def _load_head(head: nn.Module, critic_dir: str) -> None:
    if isinstance(head, ValueHead):
        path = os.path.join(critic_dir, VALUE_HEAD_WEIGHTS_NAME)
        if os.path.isfile(path):
            state = safetensors.torch.load_file(path)
        else:  # a folder saved by 0.1.0
            state = torch.load(os.path.join(critic_dir, LEGACY_VALUE_HEAD_NAME), map_location="cpu", weights_only=True)
    else:
        state = safetensors.torch.load_file(os.path.join(critic_dir, SCORE_HEAD_WEIGHTS_NAME))
    head.load_state_dict(state)


def _load_adapter(policy, folder: str, adapter_name: str) -> None:
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(policy, load_peft_weights(folder), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise RuntimeError(f"The adapter in {folder} does not fit adapter {adapter_name!r}: {result.unexpected_keys}.")


def load_weights_in_place(module: nn.Module, folder: str) -> None:
    """Copy the weights `save_pretrained` wrote to `folder` (one file or shards) into `module`, strictly except for
    weights tied to a loaded one (`save_pretrained` writes a tied pair once)."""
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [SAFE_WEIGHTS_NAME]
    loaded, unexpected = set(), []
    for file in files:
        state = safetensors.torch.load_file(os.path.join(folder, file))
        unexpected += module.load_state_dict(state, strict=False).unexpected_keys
        loaded.update(state)
    own = module.state_dict()
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in loaded if k in own}
    missing = [k for k in own if k not in loaded and own[k].untyped_storage().data_ptr() not in loaded_storage]
    if missing or unexpected:
        raise RuntimeError(f"The weights in {folder} do not fit: missing {missing}, unexpected {unexpected}.")


def _load_legacy_checkpoint(model, checkpoint_dir: str) -> None:
    """A 0.1.0 checkpoint: the trainable tensors only, keyed by their name in the `PolicyValueModel`."""
    state = safetensors.torch.load_file(os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME))
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable.intersection(result.missing_keys))
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{checkpoint_dir}: missing keys {missing}, unexpected keys {result.unexpected_keys}.")


# -- model card -------------------------------------------------------------------------------------------------------
def base_model_id(policy) -> str | None:
    """The hub id the policy was fine-tuned from (None for a local folder or a model built from a config), as TRL's
    `create_model_card` decides it."""
    config = (policy.get_base_model() if is_peft_model(policy) else policy).config
    name = getattr(config, "_name_or_path", "") or None
    return name if name and not os.path.isdir(name) else None


def build_model_card(
    model,
    args,
    tags: list[str],
    model_name: str | None,
    hub_model_id: str | None,
    dataset_name: str | None = None,
    reward_names: list[str] | None = None,
    reward_weights: list[float] | None = None,
) -> ModelCard:
    """TRL's model card (`trl.trainer.utils.generate_model_card`: tags, base model, dataset, framework versions),
    naming PPO and GAE with their papers and citations, plus the run's PPO/GAE settings."""
    wandb_url = None
    try:
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    except ImportError:
        pass
    trackio_url = get_trackio_space_url()
    if trackio_url is not None:
        tags = [t for t in tags if not t.startswith("trackio:")] + [f"trackio:{trackio_url}"]
    if "JOB_ID" in os.environ:
        tags = [*tags, "hf_jobs"]
    title, paper_id = PAPERS["ppo"]
    card = generate_model_card(
        base_model=base_model_id(model.policy),
        model_name=model_name,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        tags=sorted(set(tags)),
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        comet_url=get_comet_experiment_url(),
        trainer_name="PPO with GAE",
        trainer_citation=CITATION,
        paper_title=title,
        paper_id=paper_id,
    )
    lines = card.text.splitlines()
    at = lines.index("### Framework versions") if "### Framework versions" in lines else len(lines)
    lines[at:at] = _settings_section(model, args, reward_names, reward_weights)
    card.text = "\n".join(lines)
    return card


def trainer_model_card(trainer, model_name=None, dataset_name=None, tags=None) -> ModelCard:
    """`build_model_card` for a `PPOTrainer`: its `_tag_names`, reward functions and settings; named as TRL's trainers
    name it (the hub repository, else the output folder)."""
    if model_name is None:
        model_name = (trainer.args.hub_model_id or trainer.args.output_dir).rstrip("/").split("/")[-1]
    return build_model_card(
        trainer.accelerator.unwrap_model(trainer.model),
        trainer.args,
        tags=[*(tags or []), *trainer._tag_names],
        model_name=model_name,
        hub_model_id=trainer.hub_model_id or trainer.args.hub_model_id or model_name,
        dataset_name=dataset_name,
        reward_names=trainer.reward_func_names,
        reward_weights=trainer.reward_weights.tolist(),
    )


def _settings_section(model, args, reward_names, reward_weights) -> list[str]:
    gae_title, gae_id = PAPERS["gae"]
    critic = {
        "shared": "a value head on the policy's last hidden state",
        "adapter": f"a second LoRA adapter (`{CRITIC_ADAPTER}`) on the policy's base, with a value head",
        "separate": "its own backbone, with a value head",
    }[model.layout]
    policy = "a PEFT adapter" if is_peft_model(model.policy) else "a full model"
    lines = [
        "### PPO and GAE settings",
        "",
        f"Advantages come from generalized advantage estimation ([{gae_title}](https://huggingface.co/papers/{gae_id}))"
        f' with a learned critic: {critic} (`value_head="{model.layout}"`). The policy is saved as {policy} at the '
        f"top of the repository; the critic, to continue training, in `{CRITIC_DIR}/`.",
        "",
    ]
    if reward_names:
        weights = reward_weights or [1.0] * len(reward_names)
        lines += ["Reward functions: " + ", ".join(f"`{n}` (weight {w:g})" for n, w in zip(reward_names, weights)), ""]
    lines += ["| setting | value |", "| --- | --- |"]
    lines += [f"| `{name}` | {getattr(args, name)} |" for name in CARD_SETTINGS if hasattr(args, name)]
    return [*lines, ""]


def write_model_card(card: ModelCard, policy, output_dir: str) -> None:
    """Save `card` as `output_dir/README.md`; for a PEFT policy, let PEFT add what the Hub needs to serve an adapter
    (`library_name: peft`, its tags and version) while keeping the card's own tags."""
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    if is_peft_model(policy):
        policy.create_or_update_model_card(output_dir)
        updated = ModelCard.load(path)
        # PEFT names any base, a local folder too; the Hub metadata keeps TRL's choice (hub ids only)
        peft_tags = [t for t in updated.data.tags or [] if card.data.base_model or not t.startswith("base_model:")]
        updated.data.tags = sorted(set(card.data.tags or []) | set(peft_tags))
        updated.data.base_model = card.data.base_model
        updated.save(path)


def copy_critic_and_card(checkpoint_dir: str, output_dir: str) -> None:
    """Copy what the `Trainer`'s push from a checkpoint leaves behind (it copies the top-level weight files only)."""
    shutil.copytree(os.path.join(checkpoint_dir, CRITIC_DIR), os.path.join(output_dir, CRITIC_DIR), dirs_exist_ok=True)
    shutil.copy(os.path.join(checkpoint_dir, "README.md"), output_dir)
