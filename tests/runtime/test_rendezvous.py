"""The rank rendezvous: the launcher serves the store on a port the kernel picked, so no other
process can take the port between choosing and binding it, and every rank joins as a client."""
import socket
import textwrap

import pytest

from hybridflow.worker import rendezvous_server
from tests.gloo_launch import launch

RANK_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from hybridflow.worker import init_distributed
    rank, world = init_distributed(timeout_s=60)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    print("rank", rank, "of", world, "port", os.environ["MASTER_PORT"], "sum", float(total))
    dist.destroy_process_group()
""")


def test_store_holds_its_port_until_released():
    store, env = rendezvous_server()
    port = int(env["MASTER_PORT"])
    assert port == store.port and env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind(("", port))  # already bound by the store: nobody can take it in between
    store.set("key", "value")
    assert store.get("key") == b"value"


def test_ranks_join_as_clients_of_the_launchers_store(tmp_path):
    """Rank 0 does not bind MASTER_PORT itself (it would fail: the launcher holds it); all ranks
    connect to the launcher's store and run a collective."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    logs = launch(script, 3, [], timeout=120)
    ports = {line.split()[5] for log in logs for line in log.splitlines() if line.startswith("rank")}
    assert len(ports) == 1
    for rank, log in enumerate(logs):
        assert f"rank {rank} of 3" in log and "sum 6.0" in log, log
