"""FedPipe's importance selection: the score phase and the matrices it keeps.

Before round 1, until a selection exists, every agent scores every candidate matrix.
:meth:`Selection.add` checks one agent's scores and accumulates them, as shares of the agent's total,
weighted by its examples (capped);
:meth:`Selection.finish` keeps the top matrices (``select.count``, else ``select.fraction`` of
the candidates, ties in layer order). A phase without one valid score is repeated once
(:data:`MAX_SCORE_ATTEMPTS`), then the selection falls back to layer order.

The selection is written to ``<state_dir>/fedpipe/selection.json`` at once (a restart does not
rescore, :meth:`Selection.load`) and, by the server, to the checkpoint's metadata
(:meth:`Selection.restore`). The server owns one :class:`Selection` and passes it its current
parameters and candidate matrices (a regional tier takes both from its upstream's tasks).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.errors import StateError, UpdateRejected
from aggregator.methods import decode_update
from aggregator.methods.fedpipe.importance import normalised
from aggregator.methods.fedpipe.plan import natural
from aggregator.methods.robust import check_examples
from aggregator.store.checkpoint import atomic_write_bytes
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import TaskResult
from protocol.methods.fedpipe import spec

log = logging.getLogger(__name__)

MAX_SCORE_ATTEMPTS = 2
"""Score phases without one valid score before the selection falls back to layer order."""

SELECTION_FILE = "selection.json"


class Selection:
    """The selected matrices (in decreasing importance), their scores and the agents' mean
    tokens per example, and the running sums of a score phase."""

    def __init__(self, store: Path | None) -> None:
        self.store = store
        self.selected: list[str] = []  # in decreasing importance
        self.scores: dict[str, float] = {}
        self.tokens: dict[str, float] = {}
        self._shares: list[tuple[dict[str, float], int]] = []  # per agent: shares, weight
        self._attempts = 0
        self._scored: set[str] = set()

    def add(
        self,
        round: int,
        result: TaskResult,
        blobs: Mapping[str, memoryview],
        params: spec.Params,
        candidates: Collection[str],
        weight: int,
    ) -> dict[str, float]:
        """Check one agent's scores (one per candidate, none negative) and its mean tokens per
        example, and add them as shares of their total with ``weight`` (its examples as the
        aggregation counts them: capped at ``max_weight`` unless it is a region); raises
        :class:`UpdateRejected`. Returns the agent's scores."""
        expect = payloads.Expect(
            kind=payloads.PayloadKind.DENSE,
            method=spec.NAME,
            round=round,
            tensors={m: payloads.TensorSpec((1,), torch.float32) for m in candidates},
        )
        payload = decode_update(blobs, spec.SCORE_BLOB, expect)
        check_examples(result.num_examples, params.max_examples)
        values = {m: float(t[0]) for m, t in payload.tensors.items()}
        negative = [m for m, v in values.items() if v < 0]
        if negative:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"negative importance for {negative[0]}"
            )
        mean = result.metrics.get(spec.TOKENS_MEAN)
        if mean is not None:
            limit = params.score.max_len
            if not 1 <= mean <= limit:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{spec.TOKENS_MEAN} {mean} outside [1, {limit}]"
                )
            self.tokens[result.agent_id] = mean
        # each agent's scores as shares of its total, weighted by its capped example count: a
        # liar's vector counts like any one agent's, whatever its scale (1e30) or its claimed
        # examples (10 million); a regional tier's mean already sums to 1 and is not capped
        self._shares.append((normalised(values), weight))
        self._scored.add(result.agent_id)
        return values

    def _combined(self, params: spec.Params, candidates: Collection[str]) -> dict[str, float]:
        """The phase's scores per candidate by the aggregation rule: the example-weighted mean
        of the agents' shares (``fedavg``), else their coordinate-wise median or trimmed mean,
        one agent one vote (a liar's claimed examples then carry nothing)."""
        names = list(candidates)
        shares = np.array([[v.get(m, 0.0) for m in names] for v, _ in self._shares])
        rule = params.aggregation.rule
        if rule == "fedavg":
            weights = np.array([w for _, w in self._shares], dtype=np.float64)
            combined = weights @ shares / weights.sum()
        elif rule == "median":
            combined = np.median(shares, axis=0)
        else:
            cut = int(params.aggregation.trim * len(shares))
            ordered = np.sort(shares, axis=0)
            combined = ordered[cut : len(shares) - cut].mean(axis=0)
        return {m: float(v) for m, v in zip(names, combined, strict=True)}

    def finish(self, params: spec.Params, candidates: Collection[str]) -> dict[str, float]:
        """Keep the top matrices by mean score and save the selection; with no valid score,
        ask for another phase once, then select in layer order."""
        self._attempts += 1
        fallback = 0.0
        if not self._shares:
            if self._attempts < MAX_SCORE_ATTEMPTS:
                log.warning("fedpipe: no valid importance scores; scoring again")
                return {"scored_agents": 0.0}
            log.warning(
                "fedpipe: no valid scores after %d tries: selecting in layer order",
                self._attempts,
            )
            self.scores, fallback = dict.fromkeys(candidates, 0.0), 1.0
        else:
            self.scores = self._combined(params, candidates)
        order = sorted(candidates, key=lambda m: (-self.scores[m], natural(m)))
        s = params.select
        count = s.count if s.count is not None else max(1, round_half_up(s.fraction * len(order)))
        self.selected = order[: min(count, len(order))]
        save_json(
            self.store,
            SELECTION_FILE,
            {"selected": self.selected, "scores": self.scores, "tokens": self.tokens},
        )
        log.info("fedpipe: selected %s", self.summary(len(candidates)))
        return {
            "selected": float(len(self.selected)),
            "scored_agents": float(len(self._scored)),
            "score_fallback": fallback,
        }

    def take(
        self, params: spec.Params, candidates: Collection[str]
    ) -> tuple[int, dict[str, float], int]:
        """The phase's total weight, its combined scores times that weight (as sums), and the
        number of agents scored; the phase starts again from nothing (a regional tier answers
        with them instead of selecting)."""
        if not self._shares:
            taken: tuple[int, dict[str, float], int] = (0, {}, 0)
        else:
            weight = sum(w for _, w in self._shares)
            combined = self._combined(params, candidates)
            taken = (weight, {m: v * weight for m, v in combined.items()}, len(self._scored))
        self._shares, self._scored = [], set()
        return taken

    def summary(self, candidates: int) -> str:
        """E.g. ``6 of 14 matrices (q_proj 4, v_proj 2)``."""
        kinds: dict[str, int] = {}
        for m in self.selected:
            kind = m.rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        parts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        return f"{len(self.selected)} of {candidates} matrices ({parts})"

    def load(self, candidates: Collection[str]) -> None:
        """The selection saved in the state folder, if there is one."""
        if self.store is None or not (self.store / SELECTION_FILE).exists():
            return
        data = json.loads((self.store / SELECTION_FILE).read_text("utf-8"))
        self.restore(data["selected"], data.get("scores", {}), data.get("tokens", {}), candidates)
        log.info("fedpipe: selection read from %s", self.store / SELECTION_FILE)

    def restore(
        self,
        selected: list[str],
        scores: dict[str, float],
        tokens: Mapping[str, Any],
        candidates: Collection[str],
    ) -> None:
        unknown = [m for m in selected if m not in candidates]
        if unknown or not selected:
            raise StateError(f"fedpipe: the stored selection names unknown matrices {unknown[:3]}")
        self.selected, self.scores = list(selected), dict(scores)
        self.tokens = {a: float(t) for a, t in tokens.items()}


def save_json(store: Path | None, name: str, data: object) -> None:
    """``data`` as ``<store>/<name>``, written atomically (nothing without a state folder)."""
    if store is None:
        return
    store.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(store / name, json.dumps(data, indent=1).encode())


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
