"""The scoreboard's comparisons beyond the main table: named variants of a method (a Ferret K,
a DP budget, an ablation), grouped into sections, each judged against its own reference row.

A :class:`Variant` is one row: a method plus the ``local`` options that make it what it is
(``--param KEY=VALUE``, flags such as ``--dp-epsilon``, and for heterogeneous sections its own
agent count, ``--agent-limit`` and modelled bandwidth). A variant trains at the learning rate
the scoreboard chose for its method (the tuning budget is spent once per method, the same for
every method; a variant is that method with one thing changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    """The row's label, also its results file's stem (made filename-safe)."""
    method: str
    params: tuple[str, ...] = ()
    """``--param`` values, ``KEY=VALUE``."""
    flags: tuple[str, ...] = ()
    """Other ``local`` options, e.g. ``("--dp-epsilon", "8")``."""
    agents: int | None = None
    """Agent count if not the scoreboard's."""
    limits: tuple[str, ...] = ()
    """``--agent-limit`` values (``agent-1:memory=600MB,bandwidth=5``)."""
    bandwidth: tuple[float, ...] | None = None
    """Modelled Mbit/s per agent for the simulated clock, if not the scoreboard's."""
    alpha: float | None = None
    """Train on a Dirichlet(``alpha``) split of the held subtasks instead of the scoreboard's
    one-subtask-set-per-agent split (``alpha=100``: near-IID). The eval set is the same."""
    expensive: bool = False
    """Run after every other variant of the selected sections (an interrupted scoreboard
    has the cheap rows first)."""
    retired: str = ""
    """Why the option this row measured is gone (its results stay in the tables; it is never
    run again, and its params need not parse any more); "" for a live row."""

    def local_args(self) -> list[str]:
        out: list[str] = []
        for p in self.params:
            out += ["--param", p]
        for lim in self.limits:
            out += ["--agent-limit", lim]
        return out + list(self.flags)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    reference: str
    """The group label every row of the section is judged against (a main-table method or a
    variant name)."""
    rows: tuple[str, ...]
    """Main-table methods and variant names shown together."""
    note: str = ""
    variants: tuple[Variant, ...] = field(default=())
    reach: bool = False
    """Add the table of how soon each row reaches the reference's final Rouge-L (rounds and
    simulated seconds: the claim of a method that says it gets there faster)."""
    pairs: tuple[tuple[str, str], ...] = ()
    """(row, its own reference): rows judged against another row than the section's reference
    as well (the hetero rows against each other: same agents, same links)."""


KL0 = "align.kl_weight=0"
"""FedBiOT's ablations ran at the reference's KL weight 0, the default before 0.5 measured better."""
PROX1 = "prox=1"
"""The reference's proximal λ, FedBiOT's default until 2026-12-05: the rows measured before
then pin it (their results were run with it)."""

SECTIONS: tuple[Section, ...] = (
    Section(
        "dp",
        "Differential privacy: fedit at a target ε (issue 22)",
        "fedit",
        ("fedit",),
        "Client-level DP-FedAvg, central noise, δ = the run's default; the run stops at the "
        "target ε. `fedit` is ε = ∞.",
        (
            Variant("fedit DP eps=8", "fedit", flags=("--dp-epsilon", "8")),
            Variant("fedit DP eps=1", "fedit", flags=("--dp-epsilon", "1")),
            Variant("fedit secagg", "fedit", flags=("--secagg",)),
        ),
    ),
    Section(
        "ferret",
        "Ferret: the seed-pool size K against full-parameter FedAvg (issue 18)",
        "fedavg",
        ("fedavg", "fedit", "ferret"),
        "`ferret` is the default K = 256. Every row trains the same local steps at its method's "
        "chosen rate; Ferret sends K-bounded (seed, coefficient) triples, fedavg the dense model. "
        "`ferret secagg` is the default under secure aggregation (issue 22: the coefficients "
        "summed in fixed point under pairwise masks). `ferret slr=10/3 linear` is the "
        "reference's server step (lr 10 on its Δ/3 bases, annealed linearly to 0); `ferret "
        "pool=round` drew a fresh seed pool each round instead of the paper's one pool per run "
        "(the option is gone since: no better over these 3 seeds).",
        (
            Variant("ferret K=32", "ferret", ("ferret.k=32",)),
            Variant("ferret K=2048", "ferret", ("ferret.k=2048",), expensive=True),
            Variant("ferret secagg", "ferret", flags=("--secagg",)),
            Variant(
                "ferret slr=10/3 linear",
                "ferret",
                ("ferret.server_lr=3.3333", 'ferret.anneal="linear"'),
            ),
            Variant(
                "ferret pool=round",
                "ferret",
                ('ferret.pool="round"',),
                retired="removed after this row measured it no better than one pool per run",
            ),
        ),
        reach=True,
    ),
    Section(
        "fedbiot",
        "FedBiOT: the full model with the adapter plugged back, its ablations and fedit on the "
        "same layers (issue 19)",
        "fedbiot KL=0",
        ("fedbiot", "fedit"),
        "Every FedBiOT row scores the full model with the adapter (the last 2 layers) plugged "
        "back, on the same held-out sets as fedit. `fedbiot` is the default: drop ratio 0.5, "
        "48 alignment steps before round 1 and 8 after each round, KL weight 0.5, no proximal "
        "term (λ = 0), alignment LoRA r 4 on o_proj/down_proj. `fedbiot prox=1` is the "
        "reference's λ = 1 on the merged weights (the default until `fedbiot` at λ = 0 measured "
        "better), `fedbiot prox=0.1` a smaller λ. `fedbiot KL=0` is the reference's released "
        "KL weight at λ = 1 (the default before that); every ablation changes one thing of "
        "`fedbiot KL=0` and is judged against it (`fedbiot align qkvo r=8`: the adapter's own "
        "settings for the alignment LoRA; `fedbiot prox=0`: λ = 0 at KL 0). "
        "`fedit last 2 layers` trains LoRA on the same 2 layers of the full model (the same "
        "trainable capacity); `fedit` on all of them; both are judged against `fedbiot` in the "
        "last tables.",
        (
            Variant("fedbiot KL=0", "fedbiot", (KL0, PROX1)),
            Variant("fedit last 2 layers", "fedit", ("last_layers=2",)),
            Variant(
                "fedbiot no alignment",
                "fedbiot",
                (KL0, PROX1, "align.initial_steps=0", "align.steps=0"),
            ),
            Variant("fedbiot FedOT align once", "fedbiot", (KL0, PROX1, "align.steps=0")),
            Variant("fedbiot drop=0.2", "fedbiot", (KL0, PROX1, "emulator.drop_ratio=0.2")),
            Variant("fedbiot drop=0.35", "fedbiot", (KL0, PROX1, "emulator.drop_ratio=0.35")),
            Variant("fedbiot prox=0", "fedbiot", (KL0, "prox=0")),
            Variant("fedbiot prox=1", "fedbiot", (PROX1,)),
            Variant("fedbiot prox=0.1", "fedbiot", ("prox=0.1",)),
            Variant(
                "fedbiot align qkvo r=8",
                "fedbiot",
                (
                    KL0,
                    PROX1,
                    'align.target_modules=["q_proj","k_proj","v_proj","o_proj"]',
                    "align.r=8",
                    "align.alpha=16",
                ),
            ),
        ),
        pairs=(("fedit", "fedbiot"), ("fedit last 2 layers", "fedbiot")),
    ),
    Section(
        "slora",
        "SLoRA: sparse fine-tuning, then LoRA from its SVD, against full-parameter FedAvg "
        "(issue 21)",
        "fedavg",
        ("fedavg", "fedit", "slora"),
        "`slora` runs stage 1 (seeded sparse masks over every linear layer, fp32) for "
        "`sparse.stage1_rounds` rounds, then LoRA on all 7 linear layers initialised from the "
        "SVD of the stage-1 change. `slora init=random` is the same stage 1 with stage 2 from "
        "fedit's own initialisation; `fedit all-linear` is fedit with slora's LoRA targets "
        "(like-for-like bytes); `slora qkvo LoRA` is slora with fedit's. The main rows train on "
        "the scoreboard's split (each agent its own subtasks: strongly non-IID); the `alpha=100` "
        "rows on a near-IID Dirichlet(100) split of the same subtasks, scored on the same eval "
        "set. The first tables judge every row against the main table's fedavg (the non-IID "
        "split); the last ones judge each near-IID row against fedavg on its own split, and "
        "`slora` against its ablations on each split.",
        (
            Variant("slora init=random", "slora", ("sparse.init=random",)),
            Variant(
                "fedit all-linear",
                "fedit",
                (
                    'lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj",'
                    '"up_proj","down_proj"]',
                ),
            ),
            Variant(
                "slora qkvo LoRA",
                "slora",
                ('lora.target_modules=["q_proj","k_proj","v_proj","o_proj"]',),
            ),
            Variant("fedavg alpha=100", "fedavg", alpha=100.0),
            Variant("fedit alpha=100", "fedit", alpha=100.0),
            Variant("slora alpha=100", "slora", alpha=100.0),
            Variant("slora init=random alpha=100", "slora", ("sparse.init=random",), alpha=100.0),
        ),
        pairs=(
            ("fedit alpha=100", "fedavg alpha=100"),
            ("slora alpha=100", "fedavg alpha=100"),
            ("slora init=random alpha=100", "fedavg alpha=100"),
            ("slora init=random", "slora"),
            ("fedit all-linear", "slora"),
            ("slora qkvo LoRA", "slora"),
            ("slora init=random alpha=100", "slora alpha=100"),
            ("fedit alpha=100", "slora alpha=100"),
        ),
    ),
    Section(
        "fedpipe",
        "FedPipe: importance-selected adapters with per-agent ranks against uniform fedit r = 8 "
        "(issue 20)",
        "fedit",
        ("fedit", "fedpipe"),
        "`fedpipe` selects each agent's matrices by its importance (AdaLoRA sensitivity of the "
        "adapters, reselected every 2 rounds) and gives each its rank; the ablations change one "
        "thing. The hetero rows run 3 agents at 100, 20 and 5 Mbit/s, the slow one capped at "
        "1,300 MB, where FedPipe's memory model fits only an NF4 base at the scoreboard's "
        "`max_len` 288 (int8 needs 1,350 MB; below 1,280 nothing fits and the agent is "
        "refused); fedit hetero is uniform r = 8 on the same links, uncapped. The first "
        "tables compare every row with the 2-agent fedit; the last two, fedpipe hetero with "
        "fedit hetero.",
        (
            Variant("fedpipe random selection", "fedpipe", ("select.mode=random",)),
            Variant("fedpipe fixed r=8", "fedpipe", ("plan.ranks=[8]", "plan.rank_spread=0")),
            Variant(
                "fedit hetero",
                "fedit",
                agents=3,
                limits=(
                    "agent-1:bandwidth=100",
                    "agent-2:bandwidth=20",
                    "agent-3:bandwidth=5",
                ),
                bandwidth=(100.0, 20.0, 5.0),
            ),
            Variant(
                "fedpipe hetero",
                "fedpipe",
                ('plan.quants=["fp32","int8","nf4"]', "plan.fit_memory=false"),
                agents=3,
                limits=(
                    "agent-1:bandwidth=100",
                    "agent-2:bandwidth=20",
                    "agent-3:memory=1300MB,bandwidth=5",
                ),
                bandwidth=(100.0, 20.0, 5.0),
            ),
        ),
        reach=True,
        pairs=(("fedpipe hetero", "fedit hetero"),),
    ),
)


def all_variants() -> dict[str, Variant]:
    return {v.name: v for s in SECTIONS for v in s.variants}


def slug(name: str) -> str:
    """A label as a file-name part: ``"ferret K=2048"`` → ``"ferret_K2048"``."""
    keep = "".join(c if c.isalnum() or c in "._-" else "_" if c == " " else "" for c in name)
    return keep.replace("__", "_")
