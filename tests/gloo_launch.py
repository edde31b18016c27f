"""Run a test's worker script on several gloo ranks (one subprocess per rank, CPU only)."""
import os
import subprocess
import sys

from hybridflow.worker import rendezvous_server


def launch(script, world, args, timeout=600, **env):
    """``python script *args`` on ``world`` ranks (RANK/WORLD_SIZE/MASTER_* set, 1 torch thread, no
    CUDA, ``env`` added); asserts every rank exits 0 (else shows its output); returns the logs.
    This process serves the ranks' rendezvous store (``rendezvous_server``) until they exit."""
    store, store_env = rendezvous_server()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **store_env,
                        **{k: str(v) for k, v in env.items()})
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        del store
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n" + (logs[rank] if rank < len(logs) else "")
    return logs
