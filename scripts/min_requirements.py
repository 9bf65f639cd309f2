"""Print the declared lower bounds of the libraries whose APIs the package follows closely, pinned exactly:

    python scripts/min_requirements.py   # -> trl==1.14 transformers==5.23 peft==0.18

`.ci/run` installs these into a fresh environment (without bitsandbytes) and runs the tests there, so the minimums
in `pyproject.toml` are proven rather than guessed. Read from `pyproject.toml`, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


PINNED = ("trl", "transformers", "peft")


def minimum_pins(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement.strip())
        if match and match.group(1).lower() in PINNED:
            pins[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
    missing = [name for name in PINNED if name not in pins]
    if missing:
        sys.exit(f"pyproject.toml declares no '>=' lower bound for {', '.join(missing)}")
    return [pins[name] for name in PINNED]


if __name__ == "__main__":
    print(" ".join(minimum_pins(Path(__file__).resolve().parents[1] / "pyproject.toml")))
