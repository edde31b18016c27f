"""Synthetic verifiable tasks (data generators + their reward functions) for quick starts and tests."""
from .arithmetic import addition_reward, make_addition_data

__all__ = ["addition_reward", "make_addition_data"]
