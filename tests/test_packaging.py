"""Packaging promises: one version, optional bitsandbytes behind the `qlora` extra, a license that ships.

That the package trains without bitsandbytes at all is shown by `.ci/run`'s second run, in an environment holding
the declared minimum versions of trl, transformers and peft and no bitsandbytes (its 4-bit tests skip there).
"""

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import trl_gae_ext


ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_one_version_source():
    assert importlib.metadata.version("trl-gae-ext") == trl_gae_ext.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_license_file_is_the_declared_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Apache-2.0" in (ROOT / "pyproject.toml").read_text()


def test_changelog_names_the_current_version():
    assert f"## {trl_gae_ext.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_4bit_without_bitsandbytes_names_the_extra():
    # `sys.modules[name] = None` makes `import name` fail as if the package were not installed
    result = run_python(
        """
        import sys
        sys.modules["bitsandbytes"] = None
        from transformers import BitsAndBytesConfig
        from trl_gae_ext import PPOConfig
        from trl_gae_ext.qlora import load_policy

        args = PPOConfig(output_dir="/tmp/trl-gae-packaging", report_to="none", use_cpu=True)
        try:
            load_policy("some/model", args, BitsAndBytesConfig(load_in_4bit=True))
        except ImportError as err:
            print("ERROR:", err)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'pip install "trl-gae-ext[qlora]"' in result.stdout
