"""Built-in scorers on tricky strings."""
import pytest

from hybridflow.trainer.rewards import exact_match, extract_final_number, gsm8k, load_reward_function


@pytest.mark.parametrize("response, truth, score", [
    ("42", "42", 1.0), ("  42\n", "42 ", 1.0), ("42.", "42", 0.0), ("forty-two", "42", 0.0),
    ("b", ["a", "b"], 1.0), ("7", 7, 1.0), ("", "", 1.0), ("", "x", 0.0),
])
def test_exact_match(response, truth, score):
    assert exact_match("p", response, truth) == score


@pytest.mark.parametrize("text, expected", [
    ("so the answer is 72", "72"),
    ("12 apples then 3 more #### 15", "15"),
    ("#### 15\nwait, #### 16 and then 99", "16"),   # last marker wins over later numbers
    ("He paid $1,234.50 in total.", "$1,234.50"),
    ("1, 2, 3", "3"),
    ("List: 4, 5, 6,", "6"),
    ("It is -3 degrees", "-3"),
    ("half is .5", ".5"),
    ("no digits here", None),
    ("#### none", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize("response, truth, score", [
    ("The total is 1,234.", "1234", 1.0),
    ("#### $72", "72", 1.0),
    ("#### 72.00", "72", 1.0),
    ("She has 3 cats and 5 dogs, so 8.", "8", 1.0),
    ("costs 18 dollars #### 18\nbut 20 later", "18", 1.0),
    ("answer: -5", "-5", 1.0),
    ("answer: 5", "-5", 0.0),
    ("I give up", "5", 0.0),
    ("3 + 4 = 7", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 7", 1.0),  # full GSM8K solution as truth
    ("1000000", "1,000,000", 1.0),
    ("0.1", "0.10", 1.0),
])
def test_gsm8k(response, truth, score):
    assert gsm8k("q", response, truth) == score


def test_gsm8k_format_score_only_for_wrong_numbers():
    assert gsm8k("q", "#### 9", "8", format_score=0.1) == 0.1
    assert gsm8k("q", "no number", "8", format_score=0.1) == 0.0
    assert gsm8k("q", "#### 8", "8", format_score=0.1) == 1.0


def test_builtin_names_resolve():
    assert load_reward_function("builtin:exact_match") is exact_match
    assert load_reward_function("builtin:gsm8k") is gsm8k
