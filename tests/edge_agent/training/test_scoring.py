"""Rouge-L and exact match against values worked out by hand."""

from __future__ import annotations

import pytest

from edge_agent.training.data import Example
from edge_agent.training.scoring import exact_match, rouge_l


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # pred: the cat sat on the mat / ref: the cat was on a mat; LCS the,cat,on,mat = 4 of 6 each
    assert rouge_l("the cat sat on the mat", ["the cat was on a mat"]) == pytest.approx(2 / 3)
    # pred a b c d, ref a c e: LCS a,c = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(4 / 7)
    # order matters: LCS of "b a" and "a b" is 1 token; P = R = 1/2
    assert rouge_l("b a", ["a b"]) == pytest.approx(0.5)


def test_rouge_l_tokenizes_like_the_papers() -> None:
    assert rouge_l("Yes.", ["yes"]) == 1.0  # case and punctuation do not count
    assert rouge_l("running dogs", ["run dog"]) == 1.0  # Porter stems
    assert rouge_l("", ["yes"]) == 0.0 and rouge_l("yes", []) == 0.0


def test_the_best_reference_counts() -> None:
    refs = ["it was evening", "7:00 PM", "in the evening"]
    # "evening" against each: 2*(1*1/3)/(4/3) = 1/2; 0; 1/2 -> best 1/2
    assert rouge_l("evening", refs) == pytest.approx(0.5)
    # "at 7:00 PM" is 4 tokens (at, 7, 00, pm), "7:00 PM" 3: P = 3/4, R = 1, F = 6/7
    assert rouge_l("at 7:00 PM", refs) == pytest.approx(6 / 7)
    assert exact_match("  7:00   pm ", refs) and not exact_match("7 PM", refs)


def test_an_example_s_answers_are_its_response_then_other_references() -> None:
    ex = Example("q", "yes.", references=("yes.", "sure"))
    assert ex.answers == ("yes.", "sure")
    assert Example("q", "no").answers == ("no",)
