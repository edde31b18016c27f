"""Keep the docs honest: what README.md and docs/ tell users to run, set or read must exist.

- every ``python recipes/...``, ``python examples/...``, ``python -m ...`` and ``make ...`` command
  names a real file/module/target, and its ``key=value`` overrides pass the recipe's config check;
- every repository path in backticks and every relative link (with its #anchor) exists;
- docs/config.md documents every key of recipes/base.yaml, recipes/sft.yaml (and what grpo.yaml /
  ppo.yaml change) with the right default, and no key that is not there; its table of registry
  names matches the registries;
- code quoted from a recipe in docs/recipes.md is verbatim; the example file shown in
  docs/rewards.md is examples/my_reward.py byte for byte, and it loads and scores;
- the python snippets marked ``<!-- test -->`` run.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from hybridflow.config import ConfigError, parse_cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CONFIG_MD = ROOT / "docs" / "config.md"
RECIPES_MD = ROOT / "docs" / "recipes.md"
REWARDS_MD = ROOT / "docs" / "rewards.md"
EXAMPLE = ROOT / "examples" / "my_reward.py"

# Files the docs tell the user to create (with the recipe they are copied from).
USER_COPIES = {"recipes/grpo_rloo.py": "recipes/grpo.py"}
# Scripts without a YAML of their own whose overrides go to another recipe's config.
OVERRIDES_FOR = {"recipes/quickstart.py": "recipes/grpo.yaml"}
REPO_DIRS = ("hybridflow", "workers", "trainer", "recipes", "examples", "docs", "tests", "benchmarks")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND_START = ("python recipes/", "python examples/", "python -m ", "make ")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_fences(text: str) -> str:
    return FENCE.sub("", text)


# ----------------------------------------------------------------------------- commands
def documented_commands() -> list[tuple[str, str]]:
    """(doc, command line) for every command in a code block or inline code span."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
        lines += INLINE.findall(without_fences(text))
        for line in lines:
            line = line.strip()
            if line.startswith(COMMAND_START):
                found.append((rel(doc), line))
    return found


COMMANDS = documented_commands()


def test_docs_mention_the_quickstart_commands():
    commands = {c for _, c in COMMANDS}
    assert {"make quickstart", "make test"} <= commands


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_is_real(doc, command):
    words = shlex.split(command, comments=True)
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        missing = [t for t in targets if t not in makefile_targets()]
        assert not missing, f"{doc}: `{command}`: the Makefile has no target {missing}"
        return
    if words[1] == "-m":
        module = words[2]
        if "<" in module:  # a placeholder such as benchmarks.<name>
            return
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), \
            f"{doc}: `{command}`: no module {module} in the repository"
        return
    script, args = words[1], words[2:]
    if script in USER_COPIES:
        script = USER_COPIES[script]
    assert (ROOT / script).is_file(), f"{doc}: `{command}`: {script} does not exist"
    if not script.startswith("recipes/"):
        return
    default_config = ROOT / OVERRIDES_FOR.get(script, str(Path(script).with_suffix(".yaml")))
    if "--config" in args:  # the docs' own example file: check the overrides against the default
        i = args.index("--config")
        del args[i:i + 2]
    if not default_config.is_file():
        assert not args, f"{doc}: `{command}`: {script} has no YAML to check the overrides against"
        return
    try:
        parse_cli(args, str(default_config))
    except ConfigError as err:
        pytest.fail(f"{doc}: `{command}` is rejected by the config check: {err}")


def test_make_quickstart_runs_the_documented_script():
    makefile = (ROOT / "Makefile").read_text()
    body = re.search(r"^quickstart:.*\n((?:\t.*\n?)*)", makefile, re.M)
    assert body, "the Makefile has no quickstart target"
    assert "recipes/quickstart.py" in body.group(1), \
        "README.md and docs/quickstart.md say `make quickstart` runs recipes/quickstart.py; the Makefile runs:\n" \
        + body.group(1)


# ----------------------------------------------------------------------------- paths and links
def documented_paths() -> list[tuple[str, str]]:
    pattern = re.compile(rf"^(?:{'|'.join(REPO_DIRS)})/[\w./-]*$")
    found = []
    for doc in DOCS:
        for span in INLINE.findall(without_fences(doc.read_text())):
            if pattern.match(span) and span not in USER_COPIES:
                found.append((rel(doc), span))
    return sorted(set(found))


@pytest.mark.parametrize("doc,path", documented_paths(), ids=lambda x: x)
def test_documented_path_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} mentions `{path}`, which does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", without_fences(doc.read_text()), re.M)}


def documented_links() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_fences(doc.read_text())):
            if not target.startswith(("http://", "https://", "mailto:")):
                found.append((rel(doc), target))
    return found


@pytest.mark.parametrize("doc,target", documented_links(), ids=lambda x: x)
def test_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / doc).parent / path if path else ROOT / doc
    assert file.exists(), f"{doc}: link target {target} does not exist"
    if anchor:
        assert anchor in anchors(file), f"{doc}: {file.name} has no heading for #{anchor}; it has {sorted(anchors(file))}"


# ----------------------------------------------------------------------------- config reference
def key_tables(path: Path) -> dict[str, dict[str, str]]:
    """``<!-- keys: FILE -->`` regions of the doc → {dotted key: documented value}, up to the next
    marker or level-2 heading."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().splitlines():
        marker = re.match(r"<!-- keys: (\S+) -->", line)
        if marker:
            current = tables.setdefault(marker.group(1), {})
        elif line.startswith("## "):
            current = None
        elif current is not None:
            row = re.match(r"\| `([^`]+)` \| `([^`]*)` \|", line)
            if row:
                assert row.group(1) not in current, f"{path.name}: key {row.group(1)} documented twice"
                current[row.group(1)] = row.group(2)
    return tables


def yaml_leaves(file: str) -> dict:
    cfg = OmegaConf.load(ROOT / file)
    cfg.pop("defaults", None)
    out = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:  # an empty section ({}) is a key of its own
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg))
    return out


def same_value(documented, real) -> bool:
    """Equal and of the same type (``1`` documents an int key, ``1.0`` a float one: overrides are
    converted to the default's type)."""
    return type(documented) is type(real) and documented == real


TABLES = key_tables(CONFIG_MD)


@pytest.mark.parametrize("file", ["recipes/base.yaml", "recipes/sft.yaml", "recipes/grpo.yaml", "recipes/ppo.yaml",
                                  "recipes/gspo.yaml", "recipes/ctpo.yaml", "recipes/dapo.yaml", "recipes/rloo.yaml",
                                  "recipes/reinforce_pp.yaml", "recipes/remax.yaml", "recipes/dr_grpo.yaml",
                                  "examples/passk_grpo.yaml", "recipes/safe_rlhf.yaml", "recipes/reward_model.yaml",
                                  "recipes/ppo_rm.yaml"])
def test_config_md_documents_every_key_with_its_default(file):
    assert file in TABLES, f"docs/config.md has no `<!-- keys: {file} -->` table"
    documented, real = TABLES[file], yaml_leaves(file)
    assert not sorted(set(real) - set(documented)), \
        f"keys of {file} missing from docs/config.md: {sorted(set(real) - set(documented))}"
    assert not sorted(set(documented) - set(real)), \
        f"docs/config.md documents keys that {file} does not have: {sorted(set(documented) - set(real))}"
    wrong = {k: (documented[k], real[k]) for k in real if not same_value(yaml.safe_load(documented[k]), real[k])}
    assert not wrong, f"docs/config.md defaults differ from {file} (documented, real): {wrong}"


def test_recipe_yamls_add_no_key_to_base():
    base = set(yaml_leaves("recipes/base.yaml"))
    for file in ("recipes/grpo.yaml", "recipes/ppo.yaml"):
        extra = set(yaml_leaves(file)) - base
        assert not extra, f"{file} adds keys that base.yaml (and docs/config.md) lack: {sorted(extra)}"


def names_table() -> dict[str, set[str]]:
    text = CONFIG_MD.read_text().split("## Names you can use", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            values = set(INLINE.findall(re.sub(r"\([^)]*\)", "", cells[1])))
            for key in INLINE.findall(cells[0]):
                rows[key] = values
    return rows


def test_config_md_names_match_the_registries():
    from hybridflow.trainer.algos import ADVANTAGES, KL_PENALTIES, POLICY_LOSSES, agg_loss_modes
    from hybridflow.trainer.tracking import BACKENDS
    from hybridflow.workers.engines.base import _DTYPES
    from hybridflow.workers.engines.ops import LR_SCHEDULES
    from hybridflow.workers.roles.common import BACKENDS as ENGINE_BACKENDS

    from hybridflow.worker_group import EXECUTORS

    rows = names_table()
    expected = {
        "executor": set(EXECUTORS),
        "algorithm.adv_estimator": set(ADVANTAGES.names()),
        "actor.policy_loss": set(POLICY_LOSSES.names()),
        "actor.loss_agg_mode": set(agg_loss_modes()),
        "critic.loss_agg_mode": set(agg_loss_modes()),
        "actor.kl_loss_type": set(KL_PENALTIES.names()),
        "algorithm.kl_penalty": set(KL_PENALTIES.names()),
        "actor.lr_schedule": set(LR_SCHEDULES),
        "optim.lr_schedule": set(LR_SCHEDULES),
        "actor.dtype": set(_DTYPES),
        "trainer.trackers": set(BACKENDS),
        "actor.backend": set(ENGINE_BACKENDS),
    }
    for key, names in expected.items():
        assert key in rows, f"docs/config.md 'Names you can use' lacks a row for {key}"
        assert rows[key] == names, f"docs/config.md lists {sorted(rows[key])} for {key}; the code has {sorted(names)}"


# ----------------------------------------------------------------------------- quoted code
def marked_blocks(path: Path, marker: str) -> list[tuple[str, str]]:
    """(marker argument, code) of each ```python block right after ``<!-- marker ... -->``."""
    text = path.read_text()
    found = []
    for match in re.finditer(rf"<!-- {marker}:? ?([^>]*?) ?-->\s*```python\n(.*?)```", text, re.S):
        found.append((match.group(1).strip(), match.group(2)))
    return found


def test_recipe_quotes_are_verbatim():
    quotes = marked_blocks(RECIPES_MD, "from")
    assert len(quotes) >= 10
    for source, code in quotes:
        assert code in (ROOT / source).read_text(), \
            f"docs/recipes.md quotes code that is not (or no longer) in {source}:\n{code}"


def test_rewards_md_example_is_the_example_file():
    blocks = marked_blocks(REWARDS_MD, "example")
    assert [name for name, _ in blocks] == ["examples/my_reward.py"]
    assert blocks[0][1] == EXAMPLE.read_text(), \
        "docs/rewards.md and examples/my_reward.py differ: copy the file into the docs block"


def test_example_reward_loads_and_scores(monkeypatch):
    from hybridflow.trainer.rewards import RewardManager, is_batch_reward, load_reward_function

    monkeypatch.chdir(ROOT)  # the docs' spec is relative to the repository root
    fn = load_reward_function("examples/my_reward.py:partial_credit")
    assert fn("40213=", "31204", "31204", data_source="reverse", extra_info={}) == \
        {"score": 1.0, "correct": 1.0, "digit_accuracy": 1.0}
    assert fn("40213=", "31200", "31204")["score"] == pytest.approx(0.4) and fn("40213=", "", "31204")["score"] == 0.0
    batch = load_reward_function("examples/my_reward.py:batch_partial_credit")
    assert is_batch_reward(batch)
    for spec in ("examples/my_reward.py:partial_credit", "examples/my_reward.py:batch_partial_credit"):
        scores, metrics = RewardManager(spec)(["123=", "456="], ["321", "655"], ["321", "654"],
                                              {"data_source": ["reverse"] * 2, "extra_info": [{}, {}],
                                               "uid": ["1-0", "1-1"], "index": [0, 1]})
        assert scores.tolist() == pytest.approx([1.0, 0.5 * 2 / 3])
        assert metrics == pytest.approx({"reward/num_failed": 0.0, "reward/correct/mean": 0.5,
                                         "reward/digit_accuracy/mean": (1.0 + 2 / 3) / 2})


# ----------------------------------------------------------------------------- snippets
SNIPPETS = [(rel(doc), i, code) for doc in (REWARDS_MD, RECIPES_MD)
            for i, (_, code) in enumerate(marked_blocks(doc, "test"))]


def test_docs_have_tested_snippets():
    assert sum(doc == rel(REWARDS_MD) for doc, _, _ in SNIPPETS) >= 3


@pytest.mark.parametrize("doc,index,code", SNIPPETS, ids=[f"{d}#{i}" for d, i, _ in SNIPPETS])
def test_marked_snippet_runs(doc, index, code, monkeypatch, clean_registries):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{doc} snippet {index}", "exec"), {"__name__": f"docs_snippet_{index}"})
