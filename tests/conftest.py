"""Shared fixtures: tiny models built locally (never downloaded)."""
import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A random 2-layer Qwen2ForCausalLM + char tokenizer (hybridflow.trainer.tiny_model), fp32."""
    from hybridflow.trainer.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"))
