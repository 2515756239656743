"""The built-in demo set: correct answers, non-IID split, disjoint eval/public, files."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aggregator.errors import ConfigError
from aggregator.local.demo_data import (
    FAMILIES,
    DemoSplit,
    family_of,
    make_demo_split,
    make_examples,
    write_demo,
)

# Known answers, written out independently of the module's lists.
KNOWN_ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "cold": "hot", "wet": "dry"}
KNOWN_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima"}


def _solve(family: str, text: str) -> str | None:
    """The answer recomputed from the input; None where only a lookup can tell."""
    if family == "addition":
        a, plus, b = text.split()
        assert plus == "+" and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        return str(int(a) + int(b))
    if family == "reverse":
        return text[::-1]
    if family == "uppercase":
        return text.upper()
    if family == "next_letter":
        assert len(text) == 1 and text.isalpha() and text not in "zZ"
        return chr(ord(text) + 1)
    if family == "sort_digits":
        digits = text.split()
        assert len(digits) in (3, 4) and all(len(d) == 1 and d.isdigit() for d in digits)
        return " ".join(sorted(digits))
    if family == "count_letters":
        assert text.isalpha()
        return str(len(text))
    if family == "antonym":
        return KNOWN_ANTONYMS.get(text)
    if family == "capital":
        return KNOWN_CAPITALS.get(text)
    raise AssertionError(family)


def _key(r: dict[str, str]) -> tuple[str, str]:
    return (r["instruction"], r["input"])


def test_six_to_eight_families_with_one_instruction_each() -> None:
    assert 6 <= len(FAMILIES) <= 8
    rng = random.Random(1)
    instructions = set()
    for f in FAMILIES:
        recs = make_examples(f, 20, rng)
        assert len(recs) == 20
        assert {r["instruction"] for r in recs} == {recs[0]["instruction"]}
        assert all(set(r) == {"instruction", "input", "output"} for r in recs)
        assert all(family_of(r) == f for r in recs)
        instructions.add(recs[0]["instruction"])
    assert len(instructions) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_are_correct(family: str) -> None:
    recs = make_examples(family, 300, random.Random(7))
    checked = 0
    for r in recs:
        expected = _solve(family, r["input"])
        assert r["output"], r
        assert len(r["output"].split()) <= 4, r  # short answers
        if expected is not None:
            assert r["output"] == expected, r
            checked += 1
    if family in ("antonym", "capital"):
        # 300 draws from ~60-110 entries cover every known one
        known = KNOWN_ANTONYMS if family == "antonym" else KNOWN_CAPITALS
        assert checked >= len(known)
        # one input, one answer: a lookup table, not a guess
        table = {r["input"]: r["output"] for r in recs}
        assert all(table[r["input"]] == r["output"] for r in recs)
    else:
        assert checked == 300


def test_make_examples_is_without_replacement_while_the_family_lasts() -> None:
    recs = make_examples("capital", 50, random.Random(0))
    assert len({_key(r) for r in recs}) == 50
    assert make_examples("capital", 50, random.Random(0)) == recs


def test_split_sizes_and_counts() -> None:
    split = make_demo_split(5, per_agent=40, n_eval=48, n_public=64, alpha=0.5, seed=3)
    assert len(split.agents) == 5 and len(split.family_counts) == 5
    for recs, counts in zip(split.agents, split.family_counts, strict=True):
        assert len(recs) == 40
        assert sum(counts.values()) == 40 and set(counts) == set(FAMILIES)
        tally = Counter(family_of(r) for r in recs)
        assert {f: tally.get(f, 0) for f in FAMILIES} == counts
    assert len(split.eval) == 48 and len(split.public) == 64
    assert Counter(family_of(r) for r in split.eval) == {f: 48 // len(FAMILIES) for f in FAMILIES}
    pub = Counter(family_of(r) for r in split.public)
    assert max(pub.values()) - min(pub.values()) <= 1


def test_eval_public_and_train_are_disjoint() -> None:
    # per_agent large enough that training pools of the small families run out
    split = make_demo_split(6, per_agent=200, alpha=0.3, seed=11)
    train = {_key(r) for recs in split.agents for r in recs}
    ev = {_key(r) for r in split.eval}
    pub = {_key(r) for r in split.public}
    assert len(ev) == len(split.eval) and len(pub) == len(split.public)
    assert not ev & train
    assert not pub & train
    assert not pub & ev


def test_deterministic_in_seed() -> None:
    a = make_demo_split(3, seed=5)
    b = make_demo_split(3, seed=5)
    c = make_demo_split(3, seed=6)
    assert a == b
    assert a.agents != c.agents and a.family_counts != c.family_counts


def _mean_max_share(split: DemoSplit) -> float:
    return float(np.mean([max(c.values()) / sum(c.values()) for c in split.family_counts]))


def test_smaller_alpha_is_more_skewed() -> None:
    skewed = _mean_max_share(make_demo_split(40, alpha=0.1, seed=0))
    iid = _mean_max_share(make_demo_split(40, alpha=100.0, seed=0))
    # 8 families: near-IID max share is ~1/8 plus sampling noise; alpha=0.1 puts most on one
    assert iid < 0.3
    assert skewed > 0.5
    families_seen = [
        sum(v > 0 for v in c.values()) for c in make_demo_split(40, alpha=100.0).family_counts
    ]
    assert min(families_seen) == len(FAMILIES)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="at least one agent"):
        make_demo_split(0)
    with pytest.raises(ConfigError, match="alpha"):
        make_demo_split(2, alpha=0.0)
    with pytest.raises(ConfigError, match="too few"):
        make_demo_split(2, n_public=8 * 60)
    with pytest.raises(ConfigError, match="unknown demo task family"):
        make_examples("poetry", 1, random.Random(0))


def test_write_demo_files_parse(tmp_path: Path) -> None:
    split = make_demo_split(3, per_agent=16, seed=2)
    paths = write_demo(tmp_path / "demo", split)
    assert set(paths) == {"agent-0", "agent-1", "agent-2", "eval", "public"}
    assert paths["agent-1"] == tmp_path / "demo" / "agent-1.jsonl"

    def read(p: Path) -> list[dict[str, str]]:
        lines = p.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    for i, recs in enumerate(split.agents):
        assert read(paths[f"agent-{i}"]) == recs
    assert read(paths["eval"]) == split.eval
    assert read(paths["public"]) == split.public
