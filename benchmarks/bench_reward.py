"""Reward of the RL-step benchmark: a cheap pseudo-random score, so GRPO/PPO advantages are not
all zero (the update does the same work either way) and the reward stage costs only the decoding
and one call per sample. Spec: ``reward.function: benchmarks/bench_reward.py:pseudo_random``."""
import zlib


def pseudo_random(prompt: str, response: str, ground_truth=None, **extra) -> float:
    """A deterministic score in [0, 1) from the CRC32 of the response text."""
    return zlib.crc32(response.encode("utf-8", "surrogatepass")) / 2.0 ** 32
