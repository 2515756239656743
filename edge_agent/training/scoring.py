"""Scores of a generated answer against its references: Rouge-L and exact match.

Rouge-L is the F-measure of the longest common subsequence of tokens, computed by Google's
``rouge-score`` package as the Natural Instructions papers (and Ferret, FedKSeed) do:
``RougeScorer(["rougeL"], use_stemmer=True)``, whose tokenizer lowercases and keeps runs of
ASCII letters and digits, then Porter-stems words longer than three letters. An answer with
several references scores the best of them. Exact match compares
:func:`edge_agent.training.data.normalize_answer` of both, again the best over references.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from edge_agent.training.data import normalize_answer


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best Rouge-L F-measure of ``prediction`` over ``references`` (0 when none is given)."""
    best = 0.0
    for reference in references:
        best = max(best, float(_scorer().score(reference, prediction)["rougeL"].fmeasure))
    return best


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Whether ``prediction`` equals some reference after normalisation."""
    answer = normalize_answer(prediction)
    return any(answer == normalize_answer(r) for r in references)
