"""`benchmarks/profile_iteration.py` times the trainer's real phases: every phase it names was entered, nested rows
sit inside their phase, and the outer phases never add up to more than the timed iterations."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_profile_names_every_phase_and_accounts_for_the_time(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_iteration.py"), "--hidden-size", "32", "--num-layers", "1",
           "--num-heads", "2", "--vocab-size", "50", "--batch-size", "4", "--num-ppo-epochs", "2", "--iterations", "2",
           "--response-length", "4", "--prompt-length", "4", "--workdir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    seconds = float(re.search(r"1 timed iterations, ([\d.]+) s", out).group(1))
    rows = re.findall(r"^\| ((?:&nbsp;)*)(.+?) \| ([\d.-]+) \| (-?\d+)% \|$", out, flags=re.M)
    outer = {label: float(s) for indent, label, s, _ in rows if not indent}
    nested = {label for indent, label, _, _ in rows if indent}
    phases = {"generation", "scoring passes (no grad)", "rewards (decode, re-tokenize, reward model)",
              "update: forwards and losses", "update: backward", "update: AdamW step"}  # fmt: skip
    assert phases <= outer.keys()  # each timed at least once (a tiny model's rewards may round to 0.00 s)
    assert outer["generation"] > 0 and outer["update: backward"] > 0
    assert {"critic backbone", "reference log-probs", "log-prob pass (backbone + lm_head)"} <= nested
    other = outer.pop("other (trainer loop, GAE, statistics, logging)")
    rounding = 0.005 * (len(outer) + 1)  # every row is printed to 2 decimals
    assert other >= -rounding and abs(sum(outer.values()) + other - seconds) < rounding + 0.01 * seconds
