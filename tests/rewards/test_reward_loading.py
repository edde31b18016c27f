"""load_reward_function: path:name specs, builtins, callables and every RewardError path."""
import textwrap

import pytest

from hybridflow.trainer.rewards import RewardError, batch_reward, is_batch_reward, load_reward_function


def write(tmp_path, source, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


GOOD = """
    import dataclasses

    @dataclasses.dataclass
    class Config:          # dataclasses need the module registered while it executes
        bonus: float = 0.5

    def score(prompt, response, ground_truth, **extra):
        return float(response == ground_truth) + Config().bonus

    def _private():
        pass

    THRESHOLD = 3
"""


def test_load_by_absolute_and_relative_path(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    fn = load_reward_function(f"{path}:score")
    assert fn("p", "a", "a") == 1.5 and fn("p", "a", "b") == 0.5
    monkeypatch.chdir(tmp_path)
    assert load_reward_function("my_reward.py:score")("p", "x", "x") == 1.5
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", GOOD, "r.py")
    assert load_reward_function("sub/r.py:score")("p", "x", "y") == 0.5


def test_batch_decorator_survives_loading(tmp_path):
    path = write(tmp_path, """
        from hybridflow.trainer.rewards import batch_reward

        @batch_reward
        def scores(prompts, responses, ground_truths, **extra_lists):
            return [float(r == g) for r, g in zip(responses, ground_truths)]
    """)
    fn = load_reward_function(f"{path}:scores")
    assert is_batch_reward(fn) and fn(["p", "q"], ["a", "b"], ["a", "c"]) == [1.0, 0.0]


def test_callable_spec_is_returned_as_is():
    def fn(prompt, response, ground_truth):
        return 1.0
    assert load_reward_function(fn) is fn
    assert not is_batch_reward(fn) and is_batch_reward(batch_reward(lambda p, r, g: []))


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError, match=r"'nope\.py:score'.*file not found: .*nope\.py"):
        load_reward_function("nope.py:score")


def test_syntax_error_is_shown(tmp_path):
    path = write(tmp_path, """
        def score(prompt, response, ground_truth):
            return (1.0
        x = 1 +
    """, "broken.py")
    with pytest.raises(RewardError) as info:
        load_reward_function(f"{path}:score")
    message = str(info.value)
    assert "syntax error in" in message and "broken.py, line" in message
    assert isinstance(info.value.__cause__, SyntaxError)


def test_import_time_exception_is_shown(tmp_path):
    path = write(tmp_path, """
        import json
        TABLE = json.loads("not json")
    """, "explodes.py")
    with pytest.raises(RewardError, match=r"importing .*explodes\.py raised JSONDecodeError") as info:
        load_reward_function(f"{path}:score")
    assert 'explodes.py", line 3' in str(info.value) and 'TABLE = json.loads("not json")' in str(info.value)


def test_missing_function_lists_the_callables(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(RewardError) as info:
        load_reward_function(f"{path}:compute_score")
    message = str(info.value)
    assert "defines no 'compute_score'" in message and "my_reward.py" in message
    assert "Config, score" in message  # defined callables only: no imports, no _private, no constants
    assert "dataclasses" not in message and "_private" not in message and "THRESHOLD" not in message


def test_not_callable(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(RewardError, match=r"my_reward\.py:THRESHOLD is a int, not a callable"):
        load_reward_function(f"{path}:THRESHOLD")


def test_bad_signature_is_caught_at_load_time(tmp_path):
    path = write(tmp_path, "def score(response):\n    return 1.0\n", "sig.py")
    with pytest.raises(RewardError, match=r"sig\.py:score has signature \(response\); it must accept "
                                          r"\(prompt, response, ground_truth, \*\*extra\)"):
        load_reward_function(f"{path}:score")


@pytest.mark.parametrize("spec, pattern", [
    ("my_reward.py", "must be 'path/to/file.py:function_name'"),
    ("file.py:", "must be 'path/to/file.py:function_name'"),
    (42, "must be 'path/to/file.py:function_name'"),
    ("builtin:nope", r"unknown built-in reward 'builtin:nope'; available: builtin:addition, builtin:exact_match"),
])
def test_malformed_specs(spec, pattern):
    with pytest.raises(RewardError, match=pattern):
        load_reward_function(spec)
    assert issubclass(RewardError, ValueError)
