"""docs/write-your-own-algorithm.md and the recipe it builds (examples/passk_grpo.py).

- every code block of the guide is tested: the blocks quoting examples/passk_grpo.py are verbatim,
  in file order, and together they are the whole file; the YAML block is the example's YAML; the
  other python blocks run; the shell commands run the example with overrides its config accepts;
- the registered ``passk`` estimator gives hand-computed values and agrees with a brute-force
  enumeration of all k-subsets; ``cispo`` gives hand-computed gradients; bad input fails with a
  message naming its cause.
(The example learning on the quick-start task: tests/e2e/test_write_your_own.py.)
"""
from __future__ import annotations

import itertools
import random
import re
import runpy
import shlex
from pathlib import Path

import pytest
import torch

from hybridflow.config import parse_cli
from tests.isolation import distributed_state_restored

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "write-your-own-algorithm.md"
EXAMPLE = ROOT / "examples" / "passk_grpo.py"
EXAMPLE_YAML = ROOT / "examples" / "passk_grpo.yaml"
BLOCK = re.compile(r"(?:<!-- (from: [^>]*?|test) -->\s*)?```(\w*)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str, str]]:
    """(marker or '', language, code) of every fenced block of the guide."""
    return [(m.group(1) or "", m.group(2), m.group(3)) for m in BLOCK.finditer(GUIDE.read_text())]


@pytest.fixture
def example(clean_registries):
    return runpy.run_path(str(EXAMPLE))


# ----------------------------------------------------------------------------- the guide's blocks
def test_every_block_is_tested():
    found = blocks()
    assert len(found) >= 10
    for marker, lang, code in found:
        if lang in ("python", "yaml"):
            assert marker, \
                f"an untested {lang} block in {GUIDE.name} (mark it <!-- test --> or <!-- from: FILE -->):\n{code}"
        else:
            assert lang in ("bash", "text"), \
                f"{GUIDE.name}: a ```{lang} block: only python, yaml, bash and text blocks are checked"


def test_quoted_blocks_are_the_whole_example_file_in_order():
    text, pos = EXAMPLE.read_text(), 0
    quotes = [code for marker, lang, code in blocks() if marker == "from: examples/passk_grpo.py"]
    assert len(quotes) >= 5
    for code in quotes:
        at = text.find(code, pos)
        assert at >= 0, f"{GUIDE.name} quotes code that is not (in this order) in {EXAMPLE.name}:\n{code}"
        assert not text[pos:at].strip(), f"{EXAMPLE.name} has code the guide does not show:\n{text[pos:at]}"
        pos = at + len(code)
    assert not text[pos:].strip(), f"{EXAMPLE.name} ends with code the guide does not show:\n{text[pos:]}"


def test_yaml_block_is_the_example_config():
    yamls = [code for marker, lang, code in blocks() if lang == "yaml"]
    assert yamls == [EXAMPLE_YAML.read_text()]
    assert [marker for marker, lang, _ in blocks() if lang == "yaml"] == ["from: examples/passk_grpo.yaml"]


def test_example_is_short():
    assert len(EXAMPLE.read_text().splitlines()) <= 100


SNIPPETS = [code for marker, lang, code in blocks() if marker == "test"]


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, monkeypatch, clean_registries):
    monkeypatch.chdir(ROOT)
    with distributed_state_restored():  # the inprocess executor's rank variables and gloo group
        exec(compile(SNIPPETS[index], f"{GUIDE.name} snippet {index}", "exec"), {"__name__": f"guide_snippet_{index}"})


def test_commands_run_the_example_with_valid_overrides():
    commands = [line.strip() for _, lang, code in blocks() if lang == "bash"
                for line in code.splitlines() if line.strip()]
    assert commands and all(c.startswith("python examples/passk_grpo.py") for c in commands), commands
    for command in commands:
        parse_cli(shlex.split(command)[2:], str(EXAMPLE_YAML))  # raises ConfigError on a bad key or value


def test_guide_is_linked():
    assert "docs/write-your-own-algorithm.md" in (ROOT / "README.md").read_text()
    assert "(write-your-own-algorithm.md)" in (ROOT / "docs" / "index.md").read_text()


# ----------------------------------------------------------------------------- the estimator
def passk(example, scores, index, k, mask=None):
    rewards = torch.zeros(len(scores), 3)
    rewards[:, -1] = torch.tensor(scores, dtype=torch.float32)
    mask = torch.ones(len(scores), 3) if mask is None else mask
    adv, ret = example["passk_advantage"](rewards, mask, index=index, pass_k=k)
    assert torch.equal(adv, ret) and torch.equal(adv, adv * mask)
    return adv


def brute_force(scores, k):
    """Mean over the k-subsets containing each sample of (max of the subset − R̄) / σ, with R̄ and σ
    the mean and population std of the max over all k-subsets of the group."""
    subsets = list(itertools.combinations(range(len(scores)), k))
    best = [max(scores[j] for j in s) for s in subsets]
    mean = sum(best) / len(best)
    std = (sum((b - mean) ** 2 for b in best) / len(best)) ** 0.5
    if std == 0:
        return [0.0] * len(scores)
    return [sum((b - mean) / std for s, b in zip(subsets, best) if i in s) / sum(i in s for s in subsets)
            for i in range(len(scores))]


def test_passk_hand_computed(example):
    # one right of four; k = 2: R̄ = 1 − C(3,2)/C(4,2) = 1/2, σ = 1/2, A_wrong = (1/2 − C(2,1)/C(3,1)) / (1/2)
    adv = passk(example, [1, 0, 0, 0], ["a"] * 4, k=2)
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.allclose(adv.sum(0), torch.zeros(3), atol=1e-6)  # the advantages of a group sum to 0
    # two right of four; k = 2: R̄ = 1 − 1/6 = 5/6, σ = √5/6; A_right = (1/6)/σ, A_wrong = (1/6 − 1/3)/σ
    sigma = 5 ** 0.5 / 6
    adv = passk(example, [0, 1, 1, 0], ["a"] * 4, k=2)
    assert torch.allclose(adv[:, 0], torch.tensor([-1 / 6, 1 / 6, 1 / 6, -1 / 6]) / sigma)
    # k = 1 is GRPO with the population std: (r − 1/4) / (√3/4)
    adv = passk(example, [1, 0, 0, 0], ["a"] * 4, k=1)
    assert torch.allclose(adv[:, 0], torch.tensor([3 ** 0.5, -(3 ** -0.5), -(3 ** -0.5), -(3 ** -0.5)]))


def test_passk_zero_when_no_signal(example):
    # equal rewards (all right, all wrong); k = n; fewer wrong samples than k (every subset passes)
    for scores, k in [([1, 1, 1, 1], 2), ([0, 0, 0, 0], 2), ([1, 0, 0, 0], 4), ([0, 1, 0, 1], 4), ([1, 1, 1, 0], 2)]:
        assert torch.equal(passk(example, scores, ["a"] * 4, k), torch.zeros(4, 3)), (scores, k)
    # a group of one sample, k = 1: no baseline
    assert torch.equal(passk(example, [1], ["a"], 1), torch.zeros(1, 3))


def test_passk_groups_are_independent_and_masked(example):
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    mask[:, -1] = 1  # the score sits on the last token, which must be valid
    mask[3, 0] = 0
    adv = passk(example, [1, 0, 0, 1, 1, 1], ["x", "y", "x", "y", "x", "y"], k=2, mask=mask)
    x = passk(example, [1, 0, 1], ["x"] * 3, k=2)
    y = passk(example, [0, 1, 1], ["y"] * 3, k=2)
    assert torch.allclose(adv[[0, 2, 4]], x) and torch.allclose(adv[[1, 3, 5]] * mask[[1, 3, 5]], y * mask[[1, 3, 5]])
    assert adv[3, 0] == 0


def test_passk_matches_brute_force(example):
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        scores = [float(rng.random() < 0.4) for _ in range(n)]
        adv = passk(example, scores, ["g"] * n, k)
        assert torch.allclose(adv[:, 0].double(), torch.tensor(brute_force(scores, k), dtype=torch.float64),
                              atol=1e-5), (scores, k)


def test_passk_bad_input_names_the_cause(example):
    with pytest.raises(ValueError, match="algorithm.pass_k=5 .* rollout.n=4"):
        passk(example, [1, 0, 0, 0], ["a"] * 4, k=5)
    with pytest.raises(ValueError, match="rewards must be 0 or 1"):
        passk(example, [0.5, 0, 0, 0], ["a"] * 4, k=2)


def test_passk_through_compute_advantages(example):
    """The config key ``algorithm.pass_k`` reaches the estimator through compute_advantages."""
    from hybridflow.trainer.rl import compute_advantages
    from omegaconf import OmegaConf

    from hybridflow import DataProto

    cfg = parse_cli([], str(EXAMPLE_YAML))
    assert cfg.algorithm.adv_estimator == "passk" and cfg.algorithm.pass_k == 2
    scores = torch.zeros(4, 2)
    scores[0, -1] = 1.0
    batch = DataProto.from_dict({"token_level_scores": scores, "response_mask": torch.ones(4, 2)},
                                {"uid": ["a"] * 4})
    algo = OmegaConf.merge(cfg.algorithm, {"pass_k": 4})
    compute_advantages(batch, algo)
    assert torch.equal(batch.batch["advantages"], torch.zeros(4, 2))  # k = n
    compute_advantages(batch, cfg.algorithm)
    assert torch.allclose(batch.batch["advantages"][:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


# ----------------------------------------------------------------------------- the loss
def test_cispo_gradient_and_aggregation(example):
    loss_fn = example["cispo_loss"]
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.1, 1.0], [0.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, metrics = loss_fn(old, new, adv, mask, loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss.backward()
    # weights: ratios 1, 0.2 → 0.8, 2 → 1.28; 1, 1; token-mean over the 5 valid tokens
    weights = torch.tensor([[1.0, 0.8, 1.28], [1.0, 1.0, 0.0]])
    assert torch.allclose(new.grad, -adv * weights * mask / 5)
    assert torch.allclose(loss, (-adv * weights * new.detach() * mask).sum() / 5)
    assert float(metrics["actor/pg_clipfrac"]) == pytest.approx(2 / 5)
    seq, _ = loss_fn(old, new.detach(), adv, mask, loss_agg_mode="seq-mean-token-mean")
    per_row = [(-adv[0] * torch.tensor([1.0, 0.8, 1.2]) * new.detach()[0]).mean(),
               (-adv[1, :2] * new.detach()[1, :2]).mean()]
    assert torch.allclose(seq, torch.stack(per_row).mean())

