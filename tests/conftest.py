"""Shared fixtures: tiny models built locally (never downloaded)."""
import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A random 2-layer Qwen2ForCausalLM + char tokenizer (hybridflow.trainer.tiny_model), fp32."""
    from hybridflow.trainer.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.fixture
def clean_registries():
    """Code that a test executes (docs snippets, the example recipe) may register algorithm pieces;
    remove what it added."""
    from hybridflow.trainer.algos import ADVANTAGES, AGG_MODES, KL_PENALTIES, POLICY_LOSSES

    registries = (ADVANTAGES, AGG_MODES, KL_PENALTIES, POLICY_LOSSES)
    before = [set(r.names()) for r in registries]
    yield
    for registry, names in zip(registries, before):
        for name in set(registry.names()) - names:
            registry.unregister(name)


# Tests marked `vllm` / `megatron` / `ray` / `lora` need that extra. Without it they are skipped with the
# reason, unless HYBRIDFLOW_REQUIRE_EXTRAS names the extra (CI sets it: a broken install must fail,
# not skip). The Ray fixtures (ray_cluster, ray_e2e) skip the same way.
_EXTRA_MODULES = {"vllm": "vllm", "megatron": "megatron.core", "ray": "ray", "lora": "peft"}


def pytest_collection_modifyitems(config, items):
    import importlib.util
    import os

    required = {e.strip() for e in os.environ.get("HYBRIDFLOW_REQUIRE_EXTRAS", "").split(",") if e.strip()}
    unknown = required - set(_EXTRA_MODULES)
    if unknown:
        raise pytest.UsageError(f"HYBRIDFLOW_REQUIRE_EXTRAS: unknown extras {sorted(unknown)}; "
                                f"known: {sorted(_EXTRA_MODULES)}")
    for extra, module in _EXTRA_MODULES.items():
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            continue
        if extra in required:
            raise pytest.UsageError(f"the {extra} extra is required (HYBRIDFLOW_REQUIRE_EXTRAS) but module "
                                    f"{module!r} is not importable")
        for item in items:
            if extra in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"needs the {extra} extra: pip install -e '.[{extra}]'"))
