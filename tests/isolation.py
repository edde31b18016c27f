"""Leave the test process as a test found it: what the in-process executor changes for good."""
import os
from contextlib import contextmanager

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def distributed_state_restored():
    """The inprocess executor sets RANK/WORLD_SIZE/... in os.environ and initialises a gloo
    process group that lives as long as the process; undo both on exit (if they were not there)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    was_initialized = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized() and not was_initialized:
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
