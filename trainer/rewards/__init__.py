"""Reward functions: loading from ``path/to/file.py:fn_name`` or ``builtin:<name>``, batch
rewards, failure-tolerant scoring and the built-in scorers.

Per-sample signature: ``fn(prompt: str, response: str, ground_truth, **extra) -> float | dict``
(a dict carries ``"score"`` plus extra numeric metrics); batch signature, marked with
``@batch_reward``: ``fn(prompts: list[str], responses: list[str], ground_truths: list,
**extra_lists) -> list[float | dict]``. ``extra`` holds ``data_source``, ``extra_info`` and any
other per-sample column of the batch. Details: :mod:`.loader`, :mod:`.manager`, :mod:`.builtin`.
"""
from .builtin import BUILTINS, exact_match, extract_final_number, gsm8k, normalize_number
from .loader import RewardError, batch_reward, is_batch_reward, load_reward_function
from .manager import RewardManager, scores_to_token_level

__all__ = [
    "BUILTINS", "RewardError", "RewardManager", "batch_reward", "exact_match", "extract_final_number", "gsm8k",
    "is_batch_reward", "load_reward_function", "normalize_number", "scores_to_token_level",
]
