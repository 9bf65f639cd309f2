"""The built-in demo's task: spell out an integer 0-9999 in English words, generated deterministically in-process.

    prompt "4721"  ->  reference "four thousand seven hundred twenty one"

The demo tokenizer splits digits one per token, so the policy reads the number digit by digit and answers with
words from a 30-word vocabulary. No "and", no hyphens: the reference is exactly what `number_to_words` returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ("hundred", "thousand")
VOCABULARY = ONES + TEENS + [t for t in TENS if t != "_"] + list(SCALES)
MAX_NUMBER = 9999


def number_to_words(n: int) -> str:
    """English words for `0 <= n <= 9999`, e.g. 4721 -> "four thousand seven hundred twenty one"."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"The demo task spells integers 0-{MAX_NUMBER}, got {n}.")
    if n == 0:
        return "zero"
    words = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        words += [ONES[thousands], "thousand"]
    if hundreds:
        words += [ONES[hundreds], "hundred"]
    if rest >= 20:
        words.append(TENS[rest // 10])
        if rest % 10:
            words.append(ONES[rest % 10])
    elif rest >= 10:
        words.append(TEENS[rest - 10])
    elif rest:
        words.append(ONES[rest])
    return " ".join(words)


def tokenizer_corpus() -> list[str]:
    """Texts the demo's word-level tokenizer is trained on: every digit and every answer word."""
    return [" ".join(str(d) for d in range(10)), " ".join(VOCABULARY)]


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint sets of numbers: `sft` for the warm start, `ppo` for the PPO prompts, `heldout` for evaluation."""

    sft: tuple[int, ...]
    ppo: tuple[int, ...]
    heldout: tuple[int, ...]


def make_splits(num_sft: int, num_ppo: int, num_heldout: int, seed: int = 0) -> TaskSplits:
    """Shuffle 0-9999 with `seed` and cut it into held-out, SFT and PPO numbers (held-out first, so it does not
    depend on the other two sizes). The PPO prompts never include a held-out number; they may include SFT ones."""
    total = num_heldout + max(num_sft, num_ppo)
    if total > MAX_NUMBER + 1:
        raise ValueError(f"The task has {MAX_NUMBER + 1} numbers; {num_heldout} held out + {max(num_sft, num_ppo)}.")
    numbers = list(range(MAX_NUMBER + 1))
    random.Random(seed).shuffle(numbers)
    heldout, rest = numbers[:num_heldout], numbers[num_heldout:]
    # SFT takes the first `num_sft` training numbers; PPO sees those and fresh ones (`ppo` starts at the same place)
    return TaskSplits(sft=tuple(rest[:num_sft]), ppo=tuple(rest[:num_ppo]), heldout=tuple(heldout))


def prompt_of(n: int) -> str:
    return str(n)


def rows(numbers, completion: bool = False) -> dict[str, list[str]]:
    """Dataset columns for `numbers`: `prompt` and `reference` (plus `completion` for supervised training)."""
    data = {"prompt": [prompt_of(n) for n in numbers], "reference": [number_to_words(n) for n in numbers]}
    if completion:
        data["completion"] = [" " + ref for ref in data["reference"]]
    return data
