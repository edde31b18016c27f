"""Built-in scorers, usable as ``reward.function: builtin:<name>``.

All follow the per-sample signature ``fn(prompt, response, ground_truth, **extra) -> float``.

- ``exact_match``: 1.0 when ``response.strip() == str(ground_truth).strip()``, else 0.0
  (a list/tuple ground truth matches any of its items).
- ``gsm8k``: numeric final-answer check, see :func:`gsm8k`.
- ``addition``: the quick start's synthetic task, see
  :func:`hybridflow.trainer.tasks.arithmetic.addition_reward`.
- ``foreign_digit``: a *cost* for the digit-reversal task (Safe RLHF, ``cost.function``): 1.0 when
  the response uses a digit its prompt does not have, see :func:`foreign_digit`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from hybridflow.trainer.tasks.arithmetic import addition_reward

# A number as written in prose: optional sign and dollar sign, digits with optional thousands
# commas, optional decimals ("-$1,234.50", "72", "3.5", ".5").
_NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _candidates(ground_truth: Any) -> list[Any]:
    return list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]


def exact_match(prompt: str, response: str, ground_truth: Any, **extra: Any) -> float:
    """1.0 if the stripped response equals the stripped ground truth (any item of a list), else 0.0."""
    answer = str(response).strip()
    return 1.0 if any(answer == str(gt).strip() for gt in _candidates(ground_truth)) else 0.0


def normalize_number(text: str) -> float | None:
    """``"$1,234."`` → 1234.0: drop ``$``, commas, surrounding spaces and a trailing ``.``;
    None when what is left is not a number."""
    cleaned = str(text).strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_final_number(text: str) -> str | None:
    """The answer a response commits to: the first number after the last ``####`` if the text
    has one, else the last number in the text (as written, e.g. ``"1,234"``); None if none."""
    text = str(text)
    marker = text.rfind("####")
    if marker >= 0:
        found = _NUMBER.search(text, marker + 4)
        if found:
            return found.group(0)
    numbers = _NUMBER.findall(text)
    # "1, 2, 3" makes the pattern also swallow a trailing comma; strip it.
    numbers = [n.rstrip(",") for n in numbers if any(c.isdigit() for c in n)]
    return numbers[-1] if numbers else None


def gsm8k(prompt: str, response: str, ground_truth: Any, *, format_score: float = 0.0,
          score: float = 1.0, **extra: Any) -> float:
    """GSM8K-style numeric answer check.

    The response's answer is the number after its last ``####`` marker, else its last number;
    commas, ``$`` and a trailing ``.`` are ignored. The ground truth may be a number, a numeric
    string, or a full GSM8K solution ending in ``#### <answer>``. Returns ``score`` (1.0) when the
    two are numerically equal (relative tolerance 1e-6), ``format_score`` (0.0 by default) when the
    response has a number but it is wrong, and 0.0 when the response has no number at all.
    """
    predicted = extract_final_number(response)
    if predicted is None:
        return 0.0
    value = normalize_number(predicted)
    for gt in _candidates(ground_truth):
        gt_text = str(gt)
        if "####" in gt_text:
            gt_text = extract_final_number(gt_text) or ""
        target = normalize_number(gt_text)
        if value is not None and target is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9):
            return float(score)
    return float(format_score)


def foreign_digit(prompt: str, response: str, ground_truth: Any, **extra: Any) -> float:
    """1.0 if the response contains a digit that does not occur in the prompt, else 0.0.

    A cost a user can check by eye on the quick start's task (``"40213="``: any of 5-9 in the
    answer costs 1). The right answer never costs anything: it only reorders the prompt's digits."""
    return 1.0 if any(c.isdigit() and c not in str(prompt) for c in str(response)) else 0.0


BUILTINS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "gsm8k": gsm8k,
    "addition": addition_reward,
    "foreign_digit": foreign_digit,
}
