"""`trl-gae`: the command line.

    trl-gae ppo [--config file.yaml] [flags]   train with PPO + GAE (TRL-style YAML and flags, via `trl.TrlParser`)
    trl-gae ppo                                 no model/dataset/config: the built-in offline demo
    trl-gae demo [--smoke] [--device cuda]      the demo, by name
    trl-gae plan --model qwen2.5-7b             GPU memory estimate of a QLoRA PPO run

`trl-gae ppo` parses three dataclasses, as `trl grpo` does: `PPOScriptArguments` (dataset, columns, rewards),
`PPOConfig` (training) and TRL's `ModelConfig` (model id, dtype, 4-bit, LoRA). A YAML file given with `--config`
sets their defaults; flags override it (parsing, the short `--help` and `--help-all`: `cli_args.py`). Errors a user
can fix (a YAML value of the wrong type, an unknown key or flag, an unknown reward, an unreadable dataset, a missing
column) print one line naming the setting and the fix, without a traceback (`errors.py`); `--debug` shows the
traceback. `python -m trl_gae_ext` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field

from .data import load_any_dataset, pick_split, prepare_columns  # noqa: F401 (public here since 0.1)
from .errors import CLIError, debug_requested, format_error, run_main


PROG = "trl-gae"
# `--debug <option>` belongs to `TrainingArguments.debug`; a bare `--debug` asks for tracebacks
TRAINING_DEBUG_OPTIONS = ("underflow_overflow", "tpu_metrics_debug")
# any of these in `trl-gae ppo`'s arguments means "train my model", not "run the demo"
TRAINING_FLAGS = ("config", "model_name_or_path", "dataset_name", "h", "help", "help_all")


# -- arguments ---------------------------------------------------------------------------------------------------
def _script_arguments_base():
    from trl import ScriptArguments

    return ScriptArguments


def _reward_names() -> str:
    from .rewards.registry import EVALUATE_PREFIX, REWARD_REGISTRY

    return ", ".join([k for k in REWARD_REGISTRY if k != "evaluate"] + [f"{EVALUATE_PREFIX}<metric>"])


def make_script_arguments_class():
    """`PPOScriptArguments`, built on TRL's `ScriptArguments` (dataset name, config, splits) on first use so that
    importing this module stays light."""

    @dataclass
    class PPOScriptArguments(_script_arguments_base()):
        """Arguments of `trl-gae ppo` beyond `PPOConfig` and `ModelConfig`: data, columns and rewards."""

        dataset_name: str | None = field(
            default=None,
            metadata={
                "help": "Hub dataset id, or a local path: a .json/.jsonl/.csv/.parquet file, a directory of such "
                "files, or a directory written by `save_to_disk`."
            },
        )
        prompt_column: str = field(
            default="prompt", metadata={"help": "Dataset column with the prompts (text or chat messages)."}
        )
        reference_column: str = field(
            default="reference",
            metadata={"help": "Dataset column with the reference text(s) that metric rewards (bleu, rouge...) read."},
        )
        reward_funcs: list[str] | None = field(
            default=None,
            metadata={
                "help": "Reward functions: registry names (bleu, rouge1, rouge2, rougeL, rougeLsum, chrf, chrf++, "
                "exact_match, token_f1, evaluate:<metric>) or import paths 'my_module.my_reward'. Weighted by "
                "--reward_weights."
            },
        )
        reward_model_name_or_path: str | None = field(
            default=None,
            metadata={"help": "A sequence-classification reward model (id or path), added after --reward_funcs."},
        )
        value_model_name_or_path: str | None = field(
            default=None, metadata={"help": "A separate critic model (id or path); implies value_head='separate'."}
        )
        max_train_samples: int | None = field(
            default=None, metadata={"help": "Use only the first N training prompts (quick trials)."}
        )
        max_eval_samples: int | None = field(
            default=None, metadata={"help": "Use only the first N evaluation prompts."}
        )

    return PPOScriptArguments


def make_ppo_parser():
    """The parser of `trl-gae ppo`: a `TrlParser` over (PPOScriptArguments, PPOConfig, ModelConfig)."""
    from trl import ModelConfig

    from .cli_args import PPOArgumentParser
    from .config import PPOConfig

    return PPOArgumentParser(
        (make_script_arguments_class(), PPOConfig, ModelConfig),
        prog=f"{PROG} ppo",
        description="PPO with GAE and a learned critic. Flags override the YAML given with --config. With no "
        "--model_name_or_path, --dataset_name or --config, `trl-gae ppo` runs the built-in demo instead.",
    )


def parse_ppo_args(argv: list[str]):
    """`(script_args, ppo_config, model_config)` from `--config` YAML and flags; bad input raises `CLIError`."""
    return make_ppo_parser().parse_args_and_config(argv)


# -- rewards -----------------------------------------------------------------------------------------------------
def _import_reward(path: str):
    module_name, _, attr = path.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `my_rewards.py` next to the user's config, as `trl grpo` allows
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CLIError(
            f"cannot import reward function {path!r}: {err}",
            "check the module is importable from the current directory and defines that name",
        ) from err
    if not callable(func):
        raise CLIError(f"reward {path!r} is not callable", "point --reward_funcs at a function or callable object")
    return func


def build_rewards(script_args) -> tuple[list, bool]:
    """Reward callables (and the reward model id) from the script arguments; and whether a metric reward reads
    the reference column."""
    from .rewards import ReferenceReward, get_reward

    names = script_args.reward_funcs or []
    if not names and not script_args.reward_model_name_or_path:
        raise CLIError(
            "no reward given",
            "pass --reward_funcs (e.g. bleu rougeL) and/or --reward_model_name_or_path <sequence-classification model>",
        )
    funcs, needs_reference = [], False
    for name in names:
        if "." in name and not name.startswith("evaluate:"):
            funcs.append(_import_reward(name))
            continue
        try:
            reward = get_reward(name, reference_column=script_args.reference_column)
        except ValueError as err:
            raise CLIError(
                str(err).rstrip("."), "use a name above or an import path 'my_module.my_reward' in --reward_funcs"
            ) from err
        needs_reference |= isinstance(reward, ReferenceReward)
        funcs.append(reward)
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    return funcs, needs_reference


# -- trl-gae ppo -------------------------------------------------------------------------------------------------
def model_init_kwargs(training_args, model_args) -> dict:
    import json

    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    extra = training_args.model_init_kwargs or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as err:
            raise CLIError(f"--model_init_kwargs is not valid JSON: {err}", "write it as '{\"key\": value}'") from err
    return {**kwargs, **extra}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name


def check_model_args(script_args, training_args, model_args) -> None:
    if not model_args.model_name_or_path:
        raise CLIError(
            "no model given", "pass --model_name_or_path <hub id or local dir> (e.g. Qwen/Qwen2.5-0.5B-Instruct)"
        )
    for flag, name in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--reward_model_name_or_path", script_args.reward_model_name_or_path),
        ("--value_model_name_or_path", script_args.value_model_name_or_path),
    ):
        if name and _looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
            raise CLIError(f"{flag} {name}: no such directory", "pass a saved model directory or a hub id")
    if not script_args.dataset_name:
        raise CLIError("no dataset given", "pass --dataset_name <hub id, data file or directory>")
    if script_args.dataset_streaming:
        raise CLIError("--dataset_streaming is not supported", "PPO samples prompts by index: drop the flag")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and not model_args.use_peft:
        raise CLIError("a 4/8-bit base cannot be trained directly", "add --use_peft (LoRA adapters on the base)")
    if training_args.value_head == "adapter" and not model_args.use_peft:
        raise CLIError("value_head 'adapter' puts the critic in a second LoRA adapter", "add --use_peft")


def run_ppo(script_args, training_args, model_args) -> int:
    """Load data, rewards and model from the parsed arguments, train, save; returns the exit code."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import PPOTrainer

    check_model_args(script_args, training_args, model_args)
    reward_funcs, needs_reference = build_rewards(script_args)
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(reward_funcs):
        raise CLIError(
            f"--reward_weights has {len(training_args.reward_weights)} values for {len(reward_funcs)} rewards",
            "give one weight per reward (--reward_funcs, then --reward_model_name_or_path)",
        )
    data = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    name = script_args.dataset_name
    train = pick_split(data, script_args.dataset_train_split, name)
    train = prepare_columns(
        train, script_args, needs_reference, f"dataset {name!r} split {str(train.split or 'train')!r}"
    )
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    evaluation = pick_split(data, script_args.dataset_test_split, name, required=False)
    if evaluation is not None:
        evaluation = prepare_columns(evaluation, script_args, needs_reference, f"dataset {name!r} eval split")
        if script_args.max_eval_samples:
            evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    training_args.model_init_kwargs = model_init_kwargs(training_args, model_args)
    try:
        trainer = PPOTrainer(
            model=model_args.model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
            value_model=script_args.value_model_name_or_path,
        )
    except OSError as err:  # from_pretrained: no such model / no network / missing files
        reason = str(err).strip().splitlines()[0]
        raise CLIError(
            f"cannot load a model: {reason}",
            "check --model_name_or_path / --reward_model_name_or_path / --value_model_name_or_path (a local "
            "directory, or a hub id with network access)",
        ) from err
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    last = next((h for h in reversed(trainer.state.log_history) if "objective/scores" in h), {})
    print(
        f"trained {trainer.state.global_step // training_args.steps_per_rollout} PPO iterations; "
        f"last mean score {last.get('objective/scores', float('nan')):.4f}; saved to {training_args.output_dir}"
    )
    if evaluation is not None and training_args.eval_strategy != "no":
        metrics = trainer.evaluate()
        print("evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    trainer.end()  # finish trackers and destroy the process group (multi-GPU runs abort without it)
    return 0


def ppo_command(argv: list[str]) -> int:
    flags = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("-")}
    if not flags & set(TRAINING_FLAGS):
        from .demo import demo_main

        return demo_main(argv, prog=f"{PROG} ppo")
    return run_ppo(*parse_ppo_args(argv))


def demo_command(argv: list[str]) -> int:
    from .demo import demo_main

    return demo_main(argv)


def plan_command(argv: list[str]) -> int:
    from .planner import plan_main

    return plan_main(argv)


COMMANDS = {
    "ppo": (ppo_command, "train with PPO + GAE; with no model/dataset/config, run the built-in offline demo"),
    "demo": (demo_command, "the built-in offline demo (tiny model spells numbers; BLEU before -> after PPO)"),
    "plan": (plan_command, "estimate the GPU memory of a PPO run (4-bit QLoRA, value-head layouts)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it lists the commands (`trl-gae --help`); each command parses its own arguments."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PPO with generalized advantage estimation and a learned critic for Hugging Face TRL.",
        epilog=f"Run `{PROG} <command> --help` for a command's options. Add --debug to see tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def pop_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """Remove a bare `--debug` (show tracebacks) from `argv`; `--debug <option>` stays for `TrainingArguments`."""
    debug, rest = debug_requested(), []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "--debug" and following.split(" ")[0] not in TRAINING_DEBUG_OPTIONS:
            debug = True
        else:
            rest.append(arg)
    return debug, rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-gae` console script; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    debug, argv = pop_debug(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        error = CLIError(f"unknown command {command!r}", f"use one of {', '.join(COMMANDS)}")
        print(format_error(PROG, error), file=sys.stderr)
        return 2
    return run_main(lambda: COMMANDS[command][0](rest), prog=f"{PROG} {command}", debug=debug)


if __name__ == "__main__":
    sys.exit(main())
