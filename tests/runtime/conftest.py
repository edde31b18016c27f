import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole test session."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from hybridflow.executors.ray import ensure_ray

    ensure_ray()
    yield ray
