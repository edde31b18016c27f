"""Synthetic verifiable tasks (data generators + their reward functions) for quick starts and tests."""
from .arithmetic import addition_reward, make_addition_data
from .reverse import make_reverse_data, make_reverse_pairs

__all__ = ["addition_reward", "make_addition_data", "make_reverse_data", "make_reverse_pairs"]
