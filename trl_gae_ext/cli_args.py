"""Argument parsing of `trl-gae ppo` and the example scripts: TRL's `TrlParser`, with one-line errors and a short help.

`PPOArgumentParser` is a `TrlParser` (YAML via `--config`, flags override it) that
- checks every YAML value against its field's type and valid values before TRL takes it as a default (argparse
  converts only string defaults, so `kl_coef: [0.05]` used to reach `PPOConfig.__post_init__` as a list), and turns
  argparse's usage-and-exit into a `CLIError` naming the key or flag and the fix;
- gives the PPO choice fields (`value_head`, `kl_estimator`, ...) their valid values as argparse `choices`, so a wrong
  flag is refused with the list and the help shows it;
- prints a short `--help`: the PPO options grouped as `PPOConfig` documents them, the script's and the model's
  options, a few common `TrainingArguments`; `--help-all` prints argparse's full help (~740 lines).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from typing import Any

from trl import TrlParser

from .errors import CLIError


# PPOConfig's own fields, in the groups of its docstring; a field missing here still shows, under "other PPO options"
PPO_OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "PPO: the update": (
        "total_episodes", "num_ppo_epochs", "num_mini_batches", "cliprange", "dual_clip", "vf_coef",
        "cliprange_value", "entropy_coef", "loss_aggregation", "advantage_level",
    ),
    "PPO: the advantage estimate (GAE)": (
        "gamma", "lam", "lam_critic", "lam_adaptive_alpha", "bootstrap_truncated", "whiten_rewards",
        "whiten_advantages",
    ),
    "PPO: the KL penalty": ("kl_coef", "kl_estimator", "kl_in_reward", "scale_scores"),
    "PPO: the critic": ("value_head", "value_head_type", "value_head_dropout", "value_head_init_std", "value_head_return_scale", "critic_warmup_steps"),
    "PPO: the rollout (generation)": (
        "response_length", "max_prompt_length", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
        "stop_token", "stop_token_id", "missing_eos_penalty", "local_rollout_forward_batch_size", "generation_kwargs",
    ),
    "PPO: rewards and completion logging": ("reward_weights", "log_completions", "num_completions_to_print"),
    "PPO: the policy model and memory": ("model_init_kwargs", "trainable_layers", "logprob_chunk_size", "kbit_upcast"),
}  # fmt: skip
# the TrainingArguments most runs set; the other ~100 are behind --help-all
COMMON_TRAINING_OPTIONS = (
    "output_dir", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "seed", "bf16", "use_cpu",
    "gradient_checkpointing", "logging_steps", "report_to", "eval_strategy", "eval_steps", "save_strategy",
    "save_steps", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "disable_tqdm",
)  # fmt: skip
SECTION_TITLES = {"ModelConfig": "model, LoRA and quantization (TRL's ModelConfig)"}
NO_FLAG = re.compile(r"^--no[_-]")


def ppo_choices() -> dict[str, tuple]:
    """The valid values of PPOConfig's string-typed choice fields (checked in its `__post_init__`)."""
    from . import config
    from .value_head import VALUE_HEAD_TYPES

    return {
        "value_head": config.VALUE_HEAD_LAYOUTS,
        "advantage_level": config.ADVANTAGE_LEVELS,
        "kl_estimator": config.KL_ESTIMATORS,
        "loss_aggregation": config.LOSS_AGGREGATIONS,
        "value_head_type": VALUE_HEAD_TYPES,
        "stop_token": config.STOP_TOKENS,
    }


# -- what a field accepts ----------------------------------------------------------------------------------------
def _union_args(hint) -> tuple | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _is_number(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            kind(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int) or (kind is float and isinstance(value, float))


def accepts(hint, value) -> bool:
    """Whether a YAML value fits a field's type hint (strings are what argparse converts, so they count if they
    convert). Hints this does not know accept anything: TRL and the dataclass then decide, as before."""
    if hint is None or hint is Any:
        return True
    arms = _union_args(hint)
    if arms is not None:
        return any(accepts(arm, value) for arm in arms)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if hint is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_STRINGS)
    if hint in (int, float):
        return _is_number(value, hint)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        item = (typing.get_args(hint) or (Any,))[0]
        # a single value stays a single value, as TRL leaves it (`lora_target_modules: all-linear`)
        values = value if isinstance(value, list) else [value]
        return all(accepts(item, v) for v in values)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


_BOOL_STRINGS = {"yes", "no", "true", "false", "y", "n", "t", "f", "1", "0"}


def describe(hint, choices=None) -> str:
    """`a whole number`, `one of: a, b`, `true or false`... for error messages."""
    if choices:
        return "one of: " + ", ".join(str(c) for c in choices)
    arms = _union_args(hint)
    if arms is not None:
        parts = [describe(arm) for arm in arms if arm is not type(None)]
        return " or ".join(dict.fromkeys(parts)) + (" or null" if type(None) in arms else "")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of: " + ", ".join(str(m.value) for m in hint)
    if typing.get_origin(hint) is typing.Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is list or hint is list:
        item = (typing.get_args(hint) or (None,))[0]
        return "a list" + (f" (each {describe(item)})" if item is not None else "")
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", dict: "a mapping"}
    return names.get(typing.get_origin(hint) or hint, "a valid value")


@dataclasses.dataclass
class FieldInfo:
    hint: Any
    default: Any


def _field_infos(dataclass_types) -> dict[str, FieldInfo]:
    infos = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                default = f.default if f.default is not dataclasses.MISSING else None
                infos[f.name] = FieldInfo(hints.get(f.name), default)
    return infos


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


# -- the parser --------------------------------------------------------------------------------------------------
class _FullHelpAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(parser.format_full_help())
        parser.exit()


class PPOArgumentParser(TrlParser):
    """`TrlParser` over `dataclass_types` (one of them `PPOConfig`) whose errors are one-line `CLIError`s and whose
    `--help` is short (`--help-all`: every option)."""

    def __init__(self, dataclass_types, prog: str | None = None, description: str | None = None, **kwargs):
        prog = prog or os.path.basename(sys.argv[0])
        from .config import PPOConfig

        super().__init__(
            dataclass_types,
            prog=prog,
            description=description,
            usage=f"{prog} [--config FILE.yaml] [--OPTION VALUE ...]",
            allow_abbrev=False,  # a misspelt flag is an error, not a silent prefix match
            **kwargs,
        )
        self.add_argument("--help-all", "--help_all", action=_FullHelpAction, help="list every option and exit")
        self.fields = _field_infos(self.dataclass_types)
        self.config_path: str | None = None
        choices = ppo_choices() if any(issubclass(d, PPOConfig) for d in self.dataclass_types) else {}
        for action in self._actions:  # TrlParser itself walks `_actions` to apply YAML defaults
            if action.dest in choices and action.option_strings and not NO_FLAG.match(action.option_strings[0]):
                action.choices = choices[action.dest]

    # -- errors
    def _action(self, dest: str):
        return next((a for a in self._actions if a.dest == dest and a.option_strings), None)

    def error(self, message: str):
        """argparse prints the whole usage (170 lines) and exits; raise one line naming the flag instead."""
        match = re.match(r"argument (--[\w-]+)[^:]*: (.*)", message)
        if not match:
            raise CLIError(message, f"`{self.prog} --help` lists the options")
        flag, detail = match.groups()
        dest = flag.lstrip("-").replace("-", "_")
        action, info = self._action(dest), self.fields.get(dest)
        expected = describe(info.hint if info else None, action.choices if action else None)
        example = f", e.g. {flag} {_yaml(info.default)}" if info and info.default not in (None, "") else ""
        raise CLIError(f"{flag}: {detail}", f"pass {expected}{example}")

    def check_config(self, config: dict) -> None:
        """Raise a `CLIError` for the first unknown key or ill-typed value of the YAML mapping `config`."""
        where = f" in {self.config_path}" if self.config_path else ""
        unknown = [key for key in config if key not in self.fields]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else "remove it; "
            listed = ", ".join(repr(k) for k in unknown)
            raise CLIError(
                f"unknown key{'s' * (len(unknown) > 1)} {listed}{where}",
                hint + f"`{self.prog} --help-all` lists every option",
            )
        for key, value in config.items():
            info, action = self.fields[key], self._action(key)
            choices = action.choices if action is not None else None
            if value is None and (info.default is None or accepts(info.hint, None)):
                continue
            bad_choice = choices is not None and not isinstance(value, list) and _yaml(value) not in map(str, choices)
            if not bad_choice and accepts(info.hint, value):
                continue
            expected = describe(info.hint, choices)
            close = difflib.get_close_matches(_yaml(value), list(map(str, choices or ())), n=1)
            if close:
                fix = f"write `{key}: {close[0]}`"
            elif isinstance(value, list) and len(value) == 1 and accepts(info.hint, value[0]):
                fix = f"write one value, not a list: `{key}: {_yaml(value[0])}`"
            elif info.default is not None:
                fix = f"write {expected}, e.g. `{key}: {_yaml(info.default)}`"
            else:
                fix = f"write {expected}"
            raise CLIError(f"{key}: {value!r}{where} is not {expected}", fix)

    # -- TrlParser hooks
    def set_defaults_with_config(self, **kwargs) -> list[str]:
        self.check_config(kwargs)
        return super().set_defaults_with_config(**kwargs)

    def parse_args_and_config(self, args=None):
        """`TrlParser.parse_args_and_config`: the dataclasses, every user error (an unknown option included) raised
        as a one-line `CLIError`."""
        import yaml

        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args[:-1]:
            self.config_path = args[args.index("--config") + 1]
            if not os.path.isfile(self.config_path):
                raise CLIError(f"config file {self.config_path!r} not found", "check the path given to --config")
        try:
            *parsed, rest = super().parse_args_and_config(args, return_remaining_strings=True)
        except yaml.YAMLError as err:
            raise CLIError(f"cannot read {self.config_path}: {' '.join(str(err).split())}", "fix the YAML") from err
        except (ValueError, TypeError) as err:  # a dataclass's __post_init__ refusing a value
            text = " ".join(str(err).split())
            if "bf16" in text or "fp16" in text:
                raise CLIError(
                    text, "without a GPU, pass --bf16 false (or --use_cpu true for bf16 on the CPU)"
                ) from err
            origin = f"in {self.config_path} or its flag" if self.config_path else "with its flag"
            raise CLIError(text, f"change the setting named above ({origin})") from err
        flags = [a for a in rest if a.startswith("-")]
        if rest:
            options = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(flags[0], options, n=1) if flags else []
            hint = f"did you mean {close[0]}? " if close else ""
            plural = "s" * (len(flags) > 1)
            raise CLIError(
                f"unknown option{plural} {' '.join(rest)}", f"{hint}`{self.prog} --help-all` lists every option"
            )
        return tuple(parsed)

    # -- help
    def format_full_help(self) -> str:
        return super().format_help()

    def _sections(self) -> list[tuple[str, list]]:
        from transformers import TrainingArguments

        from .config import PPOConfig

        actions = {a.dest: a for a in self._actions if a.option_strings and not NO_FLAG.match(a.option_strings[0])}
        training = _training_argument_names()
        sections, shown = [], set()

        def add(title, names):
            group = [actions[n] for n in names if n in actions and n not in shown]
            shown.update(a.dest for a in group)
            if group:
                sections.append((title, group))

        if PPOConfig in self.dataclass_types:
            for title, names in PPO_OPTION_GROUPS.items():
                add(title, names)
        # the trainer's config first (what is left of PPOConfig, or e.g. GRPOConfig), then the script's and model's
        for dtype in sorted(self.dataclass_types, key=lambda d: not issubclass(d, TrainingArguments)):
            names = [f.name for f in dataclasses.fields(dtype)]
            if issubclass(dtype, TrainingArguments):  # PPOConfig's leftovers, or GRPOConfig's own options
                names = [n for n in names if n not in training]
                title = "PPO: other options" if dtype is PPOConfig else f"{dtype.__name__} options"
            else:
                title = SECTION_TITLES.get(dtype.__name__, f"script options ({dtype.__name__})")
            add(title, names)
        add("common training options (transformers' TrainingArguments)", COMMON_TRAINING_OPTIONS)
        return sections

    def format_help(self) -> str:
        formatter = self.formatter_class(prog=self.prog)
        formatter.add_usage(self.usage, [], [])
        formatter.add_text(self.description)
        sections = self._sections()
        for title, group in sections:
            formatter.start_section(title)
            formatter.add_arguments([_display(a, self.fields.get(a.dest)) for a in group])
            formatter.end_section()
        shown = {a.dest for _, group in sections for a in group}
        hidden = {a.dest for a in self._actions if a.dest in self.fields} - shown
        formatter.add_text(
            f"`{self.prog} --help-all` lists every option, with the {len(hidden)} not shown here (the rest of "
            "transformers' TrainingArguments: optimizer, scheduler, logging, saving, distributed training). Every "
            "option can also be a key of the YAML file given with --config; flags override the file."
        )
        return formatter.format_help()


def _display(action: argparse.Action, info: FieldInfo | None) -> argparse.Action:
    """A copy of `action` for the short help: one spelling (`--kl_coef`, not also `--kl-coef`), and the kind of value
    as metavar (`FLOAT`, `true|false`) where argparse would repeat the option's name."""
    shown = copy.copy(action)
    shown.option_strings = action.option_strings[:1]
    if action.choices is None and action.metavar is None and info is not None:
        arms = [a for a in (_union_args(info.hint) or (info.hint,)) if a is not type(None)]
        item = (
            typing.get_args(arms[0])[0] if arms and typing.get_origin(arms[0]) is list else arms[0] if arms else None
        )
        kinds = {int: "INT", float: "FLOAT", str: "TEXT", bool: "true|false", dict: "JSON"}
        shown.metavar = kinds.get(typing.get_origin(item) or item, "VALUE")
    return shown


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}
