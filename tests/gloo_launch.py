"""Run a test's worker script on several gloo ranks (one subprocess per rank, CPU only)."""
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, world, args, timeout=600, **env):
    """``python script *args`` on ``world`` ranks (RANK/WORLD_SIZE/MASTER_* set, 1 torch thread, no
    CUDA, ``env`` added); asserts every rank exits 0 (else shows its output); returns the logs."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
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
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n" + (logs[rank] if rank < len(logs) else "")
    return logs
