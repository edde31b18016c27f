"""hybridflow.config: YAML loading with `defaults`, validated key=value overrides, parse_cli and
require_choice. Every error must be a ConfigError whose message names the cause."""
import textwrap

import pytest
from omegaconf import DictConfig, OmegaConf

from hybridflow.config import ConfigError, apply_overrides, load_config, parse_cli, require_choice

BASE = """
actor:
  lr: 0.001
  epochs: 2
  clip: null
  name: ppo
trainer:
  steps: 10
  use_kl: true
  project: demo
data:
  files: [a.parquet, b.parquet]
"""


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def base(tmp_path):
    return write(tmp_path / "base.yaml", BASE)


@pytest.fixture()
def cfg(base):
    return load_config(str(base))


# ------------------------------------------------------------------ loading
def test_load_plain_yaml(cfg):
    assert isinstance(cfg, DictConfig)
    assert cfg.actor.lr == 0.001 and cfg.trainer.steps == 10 and cfg.trainer.use_kl is True
    assert list(cfg.data.files) == ["a.parquet", "b.parquet"]


def test_load_from_base_dict_without_file():
    cfg = load_config(None, ["a.b=2"], base={"a": {"b": 1}})
    assert cfg.a.b == 2


def test_defaults_are_relative_to_the_including_file_and_own_keys_win(tmp_path, base):
    child = write(tmp_path / "recipes" / "grpo.yaml", """
        defaults: [../base.yaml]
        actor:
          lr: 0.5
        algo: grpo
    """)
    cfg = load_config(str(child))
    assert cfg.actor.lr == 0.5  # the file's own key on top of the base
    assert cfg.actor.epochs == 2 and cfg.trainer.steps == 10  # the rest from the base
    assert cfg.algo == "grpo"
    assert "defaults" not in cfg


def test_several_defaults_merge_in_order_and_nest(tmp_path, base):
    write(tmp_path / "cfgs" / "fast.yaml", """
        defaults: [../base.yaml]
        trainer:
          steps: 2
    """)
    write(tmp_path / "cfgs" / "small.yaml", """
        actor:
          epochs: 1
        trainer:
          steps: 5
    """)
    top = write(tmp_path / "cfgs" / "run.yaml", """
        defaults: [fast.yaml, small.yaml]
        trainer:
          project: mine
    """)
    cfg = load_config(str(top))
    assert cfg.trainer.steps == 5  # small.yaml comes after fast.yaml
    assert cfg.actor.epochs == 1 and cfg.actor.lr == 0.001  # base.yaml reached through fast.yaml
    assert cfg.trainer.project == "mine"


def test_defaults_given_as_a_single_string_is_not_split_into_characters(tmp_path, base):
    child = write(tmp_path / "child.yaml", """
        defaults: base.yaml
        extra: 1
    """)
    try:
        cfg = load_config(str(child))
    except ConfigError as err:  # rejecting it is fine too, if the message names what was written
        assert "base.yaml" in str(err), str(err)
    else:
        assert cfg.actor.lr == 0.001 and cfg.extra == 1


def test_defaults_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\nx: 1\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\ny: 1\n")
    with pytest.raises(ConfigError, match=r"a\.yaml includes itself through 'defaults'"):
        load_config(str(tmp_path / "a.yaml"))
    write(tmp_path / "self.yaml", "defaults: [self.yaml]\n")
    with pytest.raises(ConfigError, match=r"self\.yaml includes itself"):
        load_config(str(tmp_path / "self.yaml"))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(str(missing))
    assert str(missing) in str(info.value)


def test_missing_base_file_is_named(tmp_path):
    child = write(tmp_path / "child.yaml", "defaults: [gone.yaml]\n")
    with pytest.raises(ConfigError, match="'defaults' entry 'gone.yaml' was not found") as info:
        load_config(str(child))
    assert str(tmp_path / "gone.yaml") in str(info.value) and str(child) in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "actor: [1, 2\ntrainer: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(str(bad))
    assert str(bad) in str(info.value)


def test_invalid_yaml_in_a_base_names_the_base(tmp_path):
    bad = write(tmp_path / "bad_base.yaml", "actor: {lr: \n")
    child = write(tmp_path / "child.yaml", "defaults: [bad_base.yaml]\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(str(child))
    assert str(bad) in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level") as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_empty_file_is_an_empty_config(tmp_path):
    path = write(tmp_path / "empty.yaml", "")
    assert OmegaConf.to_container(load_config(str(path))) == {}


# ------------------------------------------------------------------ overrides: keys
def test_unknown_key_lists_the_nearest_keys(cfg):
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, ["actor.lrr=1"])
    msg = str(info.value)
    assert "'actor.lrr'" in msg and "command line" in msg
    assert "Did you mean: actor.lr" in msg
    assert "Valid keys under 'actor': actor.lr, actor.epochs, actor.clip, actor.name" in msg
    assert "'+'" in msg  # says how to add a key on purpose


def test_unknown_key_with_misspelt_section(cfg):
    with pytest.raises(ConfigError, match="Did you mean: actor.lr"):
        apply_overrides(cfg, ["actr.lr=1"])


def test_unknown_top_level_key_lists_the_sections(cfg):
    with pytest.raises(ConfigError, match="Valid keys: actor, trainer, data"):
        apply_overrides(cfg, ["foo=1"])


def test_override_needs_key_equals_value(cfg):
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides(cfg, ["actor.lr"])


def test_plus_adds_a_new_key_at_any_depth(cfg):
    out = apply_overrides(cfg, ["+new.key=1", "+actor.kl.coef=0.1", "+data.name=gsm8k"])
    assert out.new.key == 1 and out.actor.kl.coef == 0.1 and out.data.name == "gsm8k"


def test_overrides_do_not_modify_the_input(cfg):
    apply_overrides(cfg, ["actor.lr=0.5", "+new.key=1"])
    assert cfg.actor.lr == 0.001 and "new" not in cfg


def test_override_value_may_contain_equals(cfg):
    assert apply_overrides(cfg, ["trainer.project=a=b"]).trainer.project == "a=b"


def test_list_value(cfg):
    assert list(apply_overrides(cfg, ["data.files=[c.parquet]"]).data.files) == ["c.parquet"]


# ------------------------------------------------------------------ overrides: types
@pytest.mark.parametrize("raw, expected", [("1e-5", 1e-05), ("-3e-4", -3e-4), ("2", 2.0), ("0.25", 0.25)])
def test_float_key_takes_float(cfg, raw, expected):
    value = apply_overrides(cfg, [f"actor.lr={raw}"]).actor.lr
    assert type(value) is float and value == expected


def test_int_key(cfg):
    out = apply_overrides(cfg, ["trainer.steps=3", "actor.epochs=4.0"])
    assert out.trainer.steps == 3 and type(out.actor.epochs) is int and out.actor.epochs == 4


@pytest.mark.parametrize("item, key", [("trainer.steps=abc", "trainer.steps"), ("trainer.steps=2.5", "trainer.steps"),
                                       ("actor.lr=fast", "actor.lr"), ("actor.lr=", "actor.lr"),
                                       ("trainer.use_kl=maybe", "trainer.use_kl"), ("trainer.use_kl=2", "trainer.use_kl")])
def test_value_of_wrong_type_names_the_key(cfg, item, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'") as info:
        apply_overrides(cfg, [item])
    assert "is not a valid" in str(info.value)


@pytest.mark.parametrize("raw, expected", [("true", True), ("True", True), ("yes", True), ("1", True),
                                           ("false", False), ("False", False), ("no", False), ("0", False)])
def test_bool_parsing(cfg, raw, expected):
    assert apply_overrides(cfg, [f"trainer.use_kl={raw}"]).trainer.use_kl is expected


def test_str_key_keeps_numbers_as_text(cfg):
    assert apply_overrides(cfg, ["trainer.project=123"]).trainer.project == "123"


@pytest.mark.parametrize("item", ["actor.lr=true", "trainer.steps=false"])
def test_bool_is_not_a_number(cfg, item):
    # `actor.lr=true` is a mistake, not 1.0
    with pytest.raises(ConfigError, match=f"config key '{item.split('=')[0]}'"):
        apply_overrides(cfg, [item])


@pytest.mark.parametrize("item", ["+actor.warmup_lr=1e-5", "actor.clip=1e-5"])
def test_scientific_notation_is_a_float_without_a_typed_default(cfg, item):
    # Written in a YAML file, `1e-5` is a float; on the command line it must be the same (a new key, or a
    # key whose default is null, has no default type to coerce to).
    key = item.lstrip("+").split("=")[0]
    assert OmegaConf.select(apply_overrides(cfg, [item]), key) == 1e-5


def test_section_cannot_be_replaced_by_a_scalar(cfg):
    # `actor` is a mapping in the YAML schema: `actor=3` would silently delete actor.lr, actor.epochs, ...
    with pytest.raises(ConfigError, match="'actor'"):
        apply_overrides(cfg, ["actor=3"])


# ------------------------------------------------------------------ parse_cli / require_choice
def test_parse_cli_uses_default_config_and_overrides(base):
    assert parse_cli(["actor.lr=2"], str(base)).actor.lr == 2.0


def test_parse_cli_config_option_replaces_the_default(tmp_path, base):
    other = write(tmp_path / "other.yaml", "defaults: [base.yaml]\ntrainer:\n  steps: 99\n")
    cfg = parse_cli(["trainer.project=x", "--config", str(other), "actor.epochs=7"], str(tmp_path / "absent.yaml"))
    assert cfg.trainer.steps == 99 and cfg.trainer.project == "x" and cfg.actor.epochs == 7


def test_parse_cli_config_equals_form(tmp_path, base):
    other = write(tmp_path / "other.yaml", "defaults: [base.yaml]\ntrainer:\n  steps: 99\n")
    assert parse_cli([f"--config={other}"], str(base)).trainer.steps == 99


def test_parse_cli_errors(base):
    with pytest.raises(ConfigError, match="--config needs a path"):
        parse_cli(["--config"], str(base))
    with pytest.raises(ConfigError, match="unknown option '--lr'"):
        parse_cli(["--lr", "1"], str(base))
    with pytest.raises(ConfigError, match="unknown config key 'actor.lrr'"):
        parse_cli(["actor.lrr=1"], str(base))
    with pytest.raises(ConfigError, match="config file not found"):
        parse_cli(["--config", str(base.parent / "missing.yaml")], str(base))


def test_require_choice(cfg):
    assert require_choice(cfg, "actor.name", ["ppo", "grpo"]) == "ppo"
    wrong = apply_overrides(cfg, ["actor.name=grp"])
    with pytest.raises(ConfigError) as info:
        require_choice(wrong, "actor.name", ["ppo", "grpo"])
    msg = str(info.value)
    assert "config key 'actor.name'" in msg and "'grp'" in msg and "['ppo', 'grpo']" in msg
    assert "Did you mean 'grpo'?" in msg
    with pytest.raises(ConfigError, match="config key 'actor.name': 'xyz' is not one of") as info:
        require_choice(apply_overrides(cfg, ["actor.name=xyz"]), "actor.name", ["ppo", "grpo"])
    assert "Did you mean" not in str(info.value)


def test_parse_cli_config_file_keys_are_checked_against_the_recipe_yaml(tmp_path, base):
    typo = write(tmp_path / "typo.yaml", "defaults: [base.yaml]\nactor:\n  lrr: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'actor.lrr' \(.*typo.yaml\).*Did you mean: actor.lr"):
        parse_cli(["--config", str(typo)], str(base))
    # a standalone file (no defaults) with known keys only, and a free-form (null) section, pass
    ok = write(tmp_path / "ok.yaml", "actor:\n  lr: 3\n")
    assert parse_cli(["--config", str(ok)], str(base)).actor.lr == 3
