"""The built-in demo instruction set for ``edgefed-aggregator local``.

Eight task families with short, deterministic, exact-match answers. Every family is a finite
universe of (input, output) pairs enumerated from the built-in lists below, so a split can make
its eval and public sets disjoint from each other and from training by construction. The
instruction is one fixed sentence per family.

:func:`make_demo_split` gives each agent a non-IID mix: a Dirichlet(alpha) draw over families
per agent (numpy ``Generator`` seeded with ``seed``), then a multinomial of ``per_agent``
examples. Small alpha means each agent sees mostly one or two families; large alpha means
every agent sees roughly the same mix. Eval and public sets are balanced over families.
Training examples are drawn from what is left after eval and public, without replacement while
a family's pool lasts and with replacement after that.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.errors import ConfigError

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

_WORD_TEXT = """
    cat dog sun moon tree bird fish book door lamp milk rain snow wind star ship road farm
    king cake frog goat hill lake leaf nest pear ring rose salt sand seed song tent wolf
    apple bread chair cloud dance earth field glass green happy horse house juice knife lemon
    money music night ocean paper piano plant queen river smile stone storm sugar table tiger
    train water whale world zebra bottle button candle castle circle forest garden guitar island
    jacket ladder market mirror orange pencil planet pocket rabbit rocket silver spider summer
    tomato window winter yellow
"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

_ANTONYMS: tuple[Pair, ...] = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("dark", "light"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("new", "old"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("thick", "thin"), ("young", "old"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("first", "last"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("true", "false"), ("clean", "dirty"),
    ("loud", "quiet"), ("heavy", "light"), ("near", "far"), ("easy", "difficult"),
    ("safe", "dangerous"), ("begin", "end"), ("love", "hate"), ("left", "right"),
    ("day", "night"), ("black", "white"), ("north", "south"), ("east", "west"),
    ("cheap", "expensive"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
    ("brave", "afraid"), ("friend", "enemy"), ("give", "take"), ("arrive", "leave"),
    ("accept", "refuse"), ("asleep", "awake"), ("increase", "decrease"), ("always", "never"),
    ("polite", "rude"), ("smooth", "rough"), ("sharp", "blunt"), ("tight", "loose"),
    ("question", "answer"), ("remember", "forget"), ("minimum", "maximum"),
)  # fmt: skip
"""Antonym pairs. Both directions are used where the reverse is unambiguous."""

_CAPITALS: tuple[Pair, ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Hungary", "Budapest"), ("Cuba", "Havana"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Argentina", "Buenos Aires"),
    ("Colombia", "Bogota"), ("Mexico", "Mexico City"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Czechia", "Prague"), ("Iceland", "Reykjavik"), ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Nigeria", "Abuja"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Nepal", "Kathmandu"),
    ("Pakistan", "Islamabad"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Switzerland", "Bern"), ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"), ("England", "London"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Mongolia", "Ulaanbaatar"), ("Qatar", "Doha"),
)  # fmt: skip

INSTRUCTIONS: dict[str, str] = {
    "addition": "Add the two numbers. Answer with the sum only.",
    "reverse": "Write the word backwards. Answer with the reversed word only.",
    "uppercase": "Write the word in capital letters. Answer with the word only.",
    "next_letter": "Give the letter that comes next in the alphabet. Answer with the letter only.",
    "antonym": "Give the opposite of the word. Answer with one word only.",
    "capital": "Name the capital city of the country. Answer with the city only.",
    "sort_digits": "Sort the digits from smallest to largest. Answer with the digits only.",
    "count_letters": "Count the letters in the word. Answer with the number only.",
}
"""One fixed instruction per family; also how a record's family is recognised."""

FAMILIES: tuple[str, ...] = tuple(INSTRUCTIONS)


@functools.cache
def _universe(family: str) -> tuple[Pair, ...]:
    """Every (input, output) pair of ``family``, in a fixed order."""
    if family == "addition":
        return tuple((f"{a} + {b}", str(a + b)) for a in range(10, 100) for b in range(10, 100))
    if family == "reverse":
        return tuple((w, w[::-1]) for w in _WORDS if w != w[::-1])
    if family == "uppercase":
        return tuple((w, w.upper()) for w in _WORDS)
    if family == "next_letter":
        pairs = []
        for letters in (string.ascii_lowercase, string.ascii_uppercase):
            pairs += [(a, b) for a, b in zip(letters, letters[1:], strict=False)]
        return tuple(pairs)
    if family == "antonym":
        forward = dict(_ANTONYMS)
        backward: dict[str, list[str]] = {}
        for a, b in _ANTONYMS:
            backward.setdefault(b, []).append(a)
        pairs = list(_ANTONYMS)
        pairs += [(b, a[0]) for b, a in backward.items() if len(a) == 1 and b not in forward]
        return tuple(pairs)
    if family == "capital":
        return _CAPITALS
    if family == "sort_digits":
        pairs = []
        for width in (3, 4):
            for k in range(10**width):
                digits = str(k).zfill(width)
                pairs.append((" ".join(digits), " ".join(sorted(digits))))
        return tuple(pairs)
    if family == "count_letters":
        return tuple((w, str(len(w))) for w in _WORDS)
    raise ConfigError(f"unknown demo task family {family!r}; known: {', '.join(FAMILIES)}")


def family_size(family: str) -> int:
    """How many distinct (instruction, input) examples ``family`` has."""
    return len(_universe(family))


def _record(family: str, pair: Pair) -> dict[str, str]:
    return {"instruction": INSTRUCTIONS[family], "input": pair[0], "output": pair[1]}


def _draw(pool: list[Pair], n: int, rng: random.Random) -> list[Pair]:
    """``n`` pairs from ``pool``: without replacement while it lasts, then with replacement."""
    if n <= len(pool):
        return rng.sample(pool, n)
    return rng.sample(pool, len(pool)) + rng.choices(pool, k=n - len(pool))


def make_examples(family: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` records ``{"instruction", "input", "output"}`` of ``family`` drawn with ``rng``."""
    if n < 0:
        raise ConfigError(f"number of examples must be >= 0, got {n}")
    return [_record(family, p) for p in _draw(list(_universe(family)), n, rng)]


def family_of(record: dict[str, str]) -> str:
    """The family a record belongs to, recognised by its instruction."""
    for family, instruction in INSTRUCTIONS.items():
        if record.get("instruction") == instruction:
            return family
    raise ConfigError(f"record does not belong to any demo family: {record!r}")


@dataclass
class DemoSplit:
    """Per-agent training sets, a shared eval set and a public (alignment) set."""

    agents: list[list[dict[str, str]]]
    eval: list[dict[str, str]]
    public: list[dict[str, str]]
    family_counts: list[dict[str, int]]
    """Per agent, how many training examples of each family (every family listed)."""


def _balanced(total: int) -> dict[str, int]:
    base, extra = divmod(total, len(FAMILIES))
    return {f: base + (1 if i < extra else 0) for i, f in enumerate(FAMILIES)}


def make_demo_split(
    n_agents: int,
    *,
    per_agent: int = 64,
    n_eval: int = 48,
    n_public: int = 64,
    alpha: float = 0.5,
    seed: int = 0,
) -> DemoSplit:
    """Split the demo set across ``n_agents`` agents non-IID; deterministic in ``seed``."""
    if n_agents < 1:
        raise ConfigError(f"need at least one agent, got {n_agents}")
    if per_agent < 1 or n_eval < 0 or n_public < 0:
        raise ConfigError(
            f"per_agent must be >= 1 and n_eval, n_public >= 0 "
            f"(got {per_agent}, {n_eval}, {n_public})"
        )
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"Dirichlet alpha must be a positive number, got {alpha}")
    eval_counts, public_counts = _balanced(n_eval), _balanced(n_public)
    for f in FAMILIES:
        if eval_counts[f] + public_counts[f] >= family_size(f):
            raise ConfigError(
                f"demo family {f!r} has {family_size(f)} distinct examples: too few for "
                f"{eval_counts[f]} eval + {public_counts[f]} public + some training examples"
            )

    gen = np.random.default_rng(seed)
    counts: list[dict[str, int]] = []
    for _ in range(n_agents):
        shares = gen.dirichlet(np.full(len(FAMILIES), alpha, dtype=np.float64))
        if not np.all(np.isfinite(shares)):  # guard against degenerate draws at tiny alpha
            shares = np.eye(len(FAMILIES))[int(gen.integers(len(FAMILIES)))]
        drawn = gen.multinomial(per_agent, shares / shares.sum())
        counts.append({f: int(c) for f, c in zip(FAMILIES, drawn, strict=True)})

    rng = random.Random(seed)
    eval_set: list[dict[str, str]] = []
    public: list[dict[str, str]] = []
    agents: list[list[dict[str, str]]] = [[] for _ in range(n_agents)]
    for f in FAMILIES:
        pool = list(_universe(f))
        rng.shuffle(pool)
        n_e, n_p = eval_counts[f], public_counts[f]
        eval_set += [_record(f, p) for p in pool[:n_e]]
        public += [_record(f, p) for p in pool[n_e : n_e + n_p]]
        train_pool = pool[n_e + n_p :]
        for i in range(n_agents):
            agents[i] += [_record(f, p) for p in _draw(train_pool, counts[i][f], rng)]
    for records in (*agents, eval_set, public):
        rng.shuffle(records)
    logger.debug("demo split: %d agents, alpha=%s, seed=%d", n_agents, alpha, seed)
    return DemoSplit(agents=agents, eval=eval_set, public=public, family_counts=counts)


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def write_demo(dir: Path, split: DemoSplit) -> dict[str, Path]:
    """Write ``agent-<i>.jsonl``, ``eval.jsonl`` and ``public.jsonl``; return them by stem."""
    dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    named = [(f"agent-{i}", r) for i, r in enumerate(split.agents)]
    for stem, records in [*named, ("eval", split.eval), ("public", split.public)]:
        path = dir / f"{stem}.jsonl"
        _write_jsonl(path, records)
        out[stem] = path
    return out
