"""Exact match of final answers, perplexity and the GSM8K answer conventions."""

from __future__ import annotations

import math

import pytest

from adapterkit.tasks.text_metrics import exact_match, extract_answer, normalize_answer, perplexity


@pytest.mark.parametrize("generated, answer, expected", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", True),
    ("#### 1,250\nThat is all.", "1250", True),
    ("So the answer is $1,250.00.", "1250", True),  # no marker: the last number
    ("First 5, then 7, so 12", "12", True),
    ("The answer is 12 apples, not 13", "12", False),  # the last number is 13
    ("#### 0.5", "0.50", True),
    ("-3 degrees", "-3", True),
    ("", "4", False),
    ("No.", "no", True),  # short text answers: the first line, normalised
    ("Yes\nbecause...", "No", False),
])
def test_exact_match(generated: str, answer: str, expected: bool) -> None:
    assert exact_match(generated, answer) is expected


def test_extract_and_normalize() -> None:
    assert extract_answer("a 1 b 22 c", numeric=True) == "22"
    assert extract_answer("Paris.\nMore text", numeric=False) == "Paris."
    assert normalize_answer(" Paris. ") == "paris"
    assert normalize_answer("72.0") == "72"


def test_perplexity_is_exp_of_mean_nll() -> None:
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    assert perplexity(1.0, 0) == math.inf
    assert perplexity(1e6, 1) == math.inf
