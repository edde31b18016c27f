"""docs/concepts.md's example is examples/runtime_demo.py, byte for byte, and the script runs on both
executors with the same scores (only the ranks that did the work differ)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "runtime_demo.py"
CONCEPTS = ROOT / "docs" / "concepts.md"
MARKER = "<!-- example: examples/runtime_demo.py -->"

ROW = re.compile(r"^row (\d+): prompt='(.*)' length=(\d+) score=(-?[\d.]+) generated_on=rank(\d+) scored_by=rank(\d+)$")
# (prompt, length): the demo's "generation" gives sample s of prompt p the length (3p + s) % 5 + 1
EXPECTED = [("1+1", 1), ("1+1", 2), ("2+3", 4), ("2+3", 5), ("7*6", 2), ("7*6", 3)]


def expected_score(prompt_id: int, length: int) -> str:
    return f"{length * 1.0 + prompt_id * 0.5 + length * prompt_id * 0.1 - 1.0:.2f}"


def run_demo(*args: str, env: dict | None = None) -> tuple[list[tuple], str]:
    proc = subprocess.run([sys.executable, str(DEMO), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"runtime_demo.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    rows = [m.groups() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert len(rows) == len(EXPECTED), proc.stdout
    for i, (row, (prompt, length)) in enumerate(zip(rows, EXPECTED)):
        assert row[:4] == (str(i), prompt, str(length), expected_score(i // 2, length)), proc.stdout
    return [(int(row[4]), int(row[5])) for row in rows], proc.stdout


def test_concepts_example_is_the_demo_file():
    text = CONCEPTS.read_text()
    assert MARKER in text, f"{CONCEPTS} lost the marker {MARKER!r} before the example"
    block = re.match(r"\s*```python\n(.*?)```", text.split(MARKER, 1)[1], re.S)
    assert block, f"no ```python block right after {MARKER!r} in {CONCEPTS}"
    assert block.group(1) == DEMO.read_text(), (
        "docs/concepts.md and examples/runtime_demo.py differ: copy the script into the docs block")


def test_demo_inprocess():
    ranks, out = run_demo("--executor", "inprocess")
    assert ranks == [(0, 0)] * 6
    assert "rank 0: dp 0/1, tp 0/1, answers=True" in out


@pytest.mark.ray
def test_demo_ray_two_ranks_tensor_parallel(ray_cluster):
    # the script joins the test session's Ray instance (RAY_ADDRESS) instead of starting its own
    address = ray_cluster.get_runtime_context().gcs_address
    ranks, out = run_demo("--executor", "ray", "--world-size", "2", env={"RAY_ADDRESS": address})
    # 3 prompts over 2 rollout ranks: rank 0 generates prompts 0-1, rank 1 prompt 2 (+1 padding row, dropped);
    # the scorer is one dp group of 2 tp ranks, and the last tp rank answers
    assert ranks == [(0, 1)] * 4 + [(1, 1)] * 2
    assert "rank 0: dp 0/1, tp 0/2, answers=False" in out and "rank 1: dp 0/1, tp 1/2, answers=True" in out
    # the output shown in docs/concepts.md is this run's output
    shown = re.search(r"```text\n(scorer layout:.*?)```", CONCEPTS.read_text(), re.S)
    assert shown, "docs/concepts.md lost the ```text block with the demo's output"
    printed = "\n".join(line for line in out.splitlines() if line.startswith(("scorer layout:", "  rank ", "row ")))
    assert shown.group(1).strip() == printed
