"""A custom reward function with partial credit, for digit answers such as the quick start's
digit-reversal task ("40213=" -> "31204"). See docs/rewards.md.

Use it with any RL recipe:

    python recipes/grpo.py reward.function=examples/my_reward.py:partial_credit
    python recipes/grpo.py reward.function=examples/my_reward.py:batch_partial_credit

``partial_credit`` is a per-sample function; ``batch_partial_credit`` does the same work once per
batch (the ``@batch_reward`` signature). Both return a dict: ``"score"`` is the reward, the other
keys are logged as ``reward/<key>/mean`` in metrics.jsonl.
"""
from hybridflow.trainer.rewards import batch_reward


def leading_digits(text: str) -> str:
    """The digits at the start of ``text`` (after leading spaces): ``" 312 and more"`` -> ``"312"``."""
    text = text.lstrip()
    end = 0
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[:end]


def partial_credit(prompt: str, response: str, ground_truth, **extra) -> dict:
    """1.0 for the exact answer; for an answer of the right length, 0.5 x the fraction of digits
    in the right place; else 0.0.

    ``prompt`` is the prompt text (``"40213="``), ``response`` the decoded response and
    ``ground_truth`` the row's ``ground_truth`` column (``"31204"``). ``extra`` holds the other
    per-sample columns: ``data_source``, ``extra_info`` (the row's dict), ``uid``, ``index``.
    """
    answer, target = leading_digits(response), str(ground_truth).strip()
    correct = answer == target
    digit_accuracy = 0.0
    if target and len(answer) == len(target):
        digit_accuracy = sum(a == b for a, b in zip(answer, target)) / len(target)
    score = 1.0 if correct else 0.5 * digit_accuracy
    return {"score": score, "correct": float(correct), "digit_accuracy": digit_accuracy}


@batch_reward
def batch_partial_credit(prompts: list, responses: list, ground_truths: list, **extra_lists) -> list:
    """The batch form of :func:`partial_credit`: one call per batch, one result per sample.
    ``extra_lists`` holds one list per extra column (``extra_lists["data_source"]``, ...)."""
    return [partial_credit(p, r, gt) for p, r, gt in zip(prompts, responses, ground_truths)]
