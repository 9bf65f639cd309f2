"""Every command in the docs and in the examples' docstrings runs as written, up to where it would need the hub.

- Python blocks of README*.md, docs/*.md and examples/*.md compile; every `PPOConfig(...)` call in them constructs the
  real `PPOConfig`; a block that builds its `PPOConfig` and a `PPOTrainer` (and no other trainer) runs with the tiny
  model of conftest in place of hub model ids, minus its `train()` / `save_model()` calls.
- Shell commands (bash blocks; `python examples/...` lines of the examples' docstrings; what `accelerate launch` and
  `torchrun` start) go through the real parser: `trl-gae ppo` through `cli.parse_ppo_args` and the checks `run_ppo`
  makes before loading anything, `trl-gae ppo` without model/dataset and `trl-gae demo` through the demo's parser,
  `trl-gae plan` runs, `python examples/x.py` through the example's own `TrlParser`.

Stand-ins, only for what a reader is told to bring: `STAND_INS` maps placeholder paths (`my_run.yaml`, a model
directory) to real files, and `--use_cpu true` is added on a machine without CUDA so that documented `--bf16` runs
parse (TrainingArguments refuses bf16 without a GPU otherwise). tests/test_cli.py and tests/test_examples.py train the
CLI and the examples for real; this file checks that what the docs print is accepted.
"""

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from trl_gae_ext import PPOConfig, PPOTrainer, cli
from trl_gae_ext.demo import build_demo_parser


ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("README*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.md")])
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
STAND_INS = {
    "my_run.yaml": "examples/qlora_7b_24gb.yaml",  # a `trl-gae ppo` YAML of the repo in place of the user's own
}
# placeholders for the user's own model directory / config file (filled in with the tiny model at run time)
MODEL_PLACEHOLDERS = ("./my-model-dir", "path/to/config.json")


def _fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """`(language, text, line number)` of every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _python_blocks() -> list:
    return [
        pytest.param(text, id=f"{path.relative_to(ROOT)}:{line}")
        for path in DOCS
        for lang, text, line in _fenced_blocks(path)
        if lang == "python"
    ]


def _split_commands(text: str) -> list[list[str]]:
    """Shell text -> argv lists: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return [c for c in commands if c]


def _docstring_commands(path: Path) -> list[list[str]]:
    """The usage lines of an example's docstring: indented `python examples/...` commands."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    usage = re.findall(r"^    (python examples/.*?)(?=\n(?!        )|\Z)", doc, flags=re.S | re.M)
    return [c for block in usage for c in _split_commands(block)]


def _not_run(argv: list[str]) -> bool:
    """Installs and the test suite itself."""
    return argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]


def _shell_commands() -> list:
    params = []
    for path in DOCS:
        for lang, text, line in _fenced_blocks(path):
            if lang in SHELL_LANGS:
                for i, argv in enumerate(c for c in _split_commands(text) if not _not_run(c)):
                    params.append(pytest.param(argv, id=f"{path.relative_to(ROOT)}:{line}:{i}"))
    for path in EXAMPLES:
        for i, argv in enumerate(_docstring_commands(path)):
            params.append(pytest.param(argv, id=f"{path.relative_to(ROOT)}:docstring:{i}"))
    return params


def _stand_in(argv: list[str], model_dir: str) -> list[str]:
    placeholders = {**STAND_INS, MODEL_PLACEHOLDERS[0]: model_dir, MODEL_PLACEHOLDERS[1]: f"{model_dir}/config.json"}
    return [placeholders.get(a, a) for a in argv]


def _on_this_machine(argv: list[str]) -> list[str]:
    """Training flags as written, plus `--use_cpu true` without CUDA (bf16 is refused on the CPU otherwise)."""
    return argv if torch.cuda.is_available() else [*argv, "--use_cpu", "true"]


def _example_parser(path: Path):
    """The `TrlParser` the example's `main` builds (its dataclasses read from the source, not copied here)."""
    spec = importlib.util.spec_from_file_location(f"doc_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    call = next(
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "TrlParser"
    )
    return eval(compile(ast.Expression(call), str(path), "eval"), vars(module))


def _check_trl_gae(argv: list[str], capsys) -> None:
    command, rest = argv[0], argv[1:]
    assert command in cli.COMMANDS, f"unknown command in the docs: trl-gae {command}"
    if command == "plan":
        assert cli.main(["plan", *rest]) == 0, capsys.readouterr().err
        return
    flags = {a.split("=")[0].lstrip("-").replace("-", "_") for a in rest if a.startswith("-")}
    if command == "demo" or not flags & set(cli.TRAINING_FLAGS):
        build_demo_parser().parse_args(rest)
        return
    script, args, model = cli.parse_ppo_args(_on_this_machine(rest))
    cli.check_model_args(script, args, model)
    rewards, _ = cli.build_rewards(script)
    assert args.reward_weights is None or len(args.reward_weights) == len(rewards)


def _check(argv: list[str], capsys) -> None:
    if argv[0] in ("accelerate", "torchrun"):
        if argv[0] == "accelerate":
            assert argv[1] == "launch"
            config = argv[argv.index("--config_file") + 1]
            assert (ROOT / config).is_file(), config
        if "-m" in argv:  # `-m trl_gae_ext.cli <command> ...`
            start = argv.index("-m")
            assert argv[start + 1] == "trl_gae_ext.cli"
            return _check_trl_gae(argv[start + 2 :], capsys)
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        return _check(["python", *argv[script:]], capsys)
    if argv[0] == "trl-gae":
        return _check_trl_gae(argv[1:], capsys)
    assert argv[0] == "python", f"a command the test does not know: {shlex.join(argv)}"
    script = ROOT / argv[1]
    assert script.is_file(), argv[1]
    if argv[1].startswith("examples/"):
        _example_parser(script).parse_args_and_config(_on_this_machine(argv[2:]))


@pytest.mark.parametrize("argv", _shell_commands())
def test_documented_command_parses(argv, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # commands are written from the repository root
    _check(_stand_in(argv, tiny_model_dir), capsys)


class _ToTinyModel(ast.NodeTransformer):
    """`PPOTrainer("org/model", ...)` -> the tiny model directory; `trainer.train()` / `.save_model()` dropped."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def visit_Call(self, node):
        self.generic_visit(node)
        if ast.unparse(node.func) == "PPOTrainer":
            if node.args and isinstance(node.args[0], ast.Constant):
                node.args[0] = ast.Constant(self.model_dir)
            for kw in node.keywords:
                if kw.arg in ("model", "value_model") and isinstance(kw.value, ast.Constant):
                    kw.value = ast.Constant(self.model_dir)
        return node

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
            if call.func.attr in ("train", "save_model", "push_to_hub"):
                return None
        return self.generic_visit(node)


def _calls(tree, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] == name]


@pytest.mark.parametrize("text", _python_blocks())
def test_documented_python_runs_up_to_training(text, tiny_model_dir, tmp_path, monkeypatch):
    tree = ast.parse(text)
    compile(tree, "<doc>", "exec")
    monkeypatch.chdir(tmp_path)  # relative output_dir / data files land here
    for call in _calls(tree, "PPOConfig"):  # literal arguments in every doc: the real dataclass checks them
        assert isinstance(eval(compile(ast.Expression(call), "<doc>", "eval"), {"PPOConfig": PPOConfig}), PPOConfig)
    # a self-contained quick start (its own config, one of our trainers, no other trainer) runs for real
    other_trainers = [c for name in ("GRPOTrainer", "RLOOTrainer", "SFTTrainer") for c in _calls(tree, name)]
    if not (_calls(tree, "PPOConfig") and _calls(tree, "PPOTrainer")) or other_trainers:
        return
    (tmp_path / "data").mkdir()
    rows = [{"prompt": f"Translate to French: word {i}", "reference": f"mot {i}"} for i in range(16)]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    namespace = {"__name__": "doc_block"}
    exec(compile(ast.fix_missing_locations(_ToTinyModel(tiny_model_dir).visit(tree)), "<doc>", "exec"), namespace)
    assert any(isinstance(v, PPOTrainer) for v in namespace.values())


def test_the_docs_hold_the_commands_this_file_checks():
    argvs = [p.values[0] for p in _shell_commands()]
    heads = {tuple(a[:2]) for a in argvs}
    assert {("trl-gae", "ppo"), ("trl-gae", "plan")} <= heads
    examples = {a[1] for a in argvs if a[0] == "python" and a[1].startswith("examples/")}
    assert examples == {f"examples/{p.name}" for p in EXAMPLES}  # every example's docstring has its usage line
    assert sum("PPOConfig(" in p.values[0] for p in _python_blocks()) >= 4
