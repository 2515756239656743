"""The LoRA layout a task asks for, derived from the task, never learnt from the first sender.

An update's tensor names and shapes follow from the task: the base model's target linears
(``lora.target_modules``), each ``(out, in)``, and the rank ``lora.r`` (or ``rank_pattern``'s,
matched as peft matches it) give ``<module>.lora_A.weight [r, in]`` and
``<module>.lora_B.weight [out, r]`` under peft's ``base_model.model.`` prefix.

- With the base model at hand (``run.model_dir``), :func:`expected_layout` reads the linears'
  shapes from its safetensors headers: the layout is exact before any agent has sent anything.
- Without it, :func:`check_task_layout` checks what can be known from the task alone (every name
  is a factor of a target module, factors pair up, ranks are the task's), and the round-1
  layout is the one most agents sent (:class:`LayoutVote`), never the first one to arrive; an
  update in a layout that lost the vote is left out of the aggregate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from aggregator.errors import UpdateRejected
from aggregator.methods._targets import is_target, target_shapes
from aggregator.methods.robust import Aggregator
from protocol.errors import ErrorCode
from protocol.methods._common import LoraParams

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
MAX_LAYOUTS = 4
"""Distinct round-1 layouts held at once (without a model); an update in a further one is
refused, so a flood of odd layouts costs at most this many running sums."""

Layout = dict[str, tuple[int, ...]]
Signature = tuple[tuple[str, tuple[int, ...]], ...]


def rank_for(module: str, lora: LoraParams) -> int:
    """The rank ``module`` (a model module name) gets: peft's ``rank_pattern`` rule, else r."""
    for key, rank in lora.rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return rank
    return lora.r


_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a weight or factor name belongs to (``...layers.<i>....``), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def last_layers(model_dir: Path, n: int) -> tuple[int, ...]:
    """The indices of the last ``n`` decoder layers of the model in ``model_dir`` (its
    ``config.json``)."""
    import json

    from aggregator.errors import ConfigError

    try:
        total = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the layer count of {model_dir}: {exc}") from None
    if not 1 <= n <= total:
        raise ConfigError(f"the model has {total} decoder layers; cannot adapt the last {n}")
    return tuple(range(total - n, total))


def expected_layout(
    model_dir: Path, lora: LoraParams, layers: tuple[int, ...] | None = None
) -> Layout:
    """Every LoRA factor's name and shape for the target linears of the model in
    ``model_dir`` (read from its safetensors headers; no weight is loaded); ``layers``: only
    those decoder layers' (None: every layer)."""
    layout: Layout = {}
    for name, (out_f, in_f) in target_shapes(model_dir, tuple(lora.target_modules)).items():
        if layers is not None and layer_index(name) not in layers:
            continue
        module = name.removesuffix(".weight")
        r = rank_for(module, lora)
        layout[PEFT_PREFIX + module + A_SUFFIX] = (r, in_f)
        layout[PEFT_PREFIX + module + B_SUFFIX] = (out_f, r)
    return layout


def signature(tensors: Mapping[str, torch.Tensor]) -> Signature:
    return tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items()))


def check_task_layout(tensors: Mapping[str, torch.Tensor], lora: LoraParams) -> None:
    """Reject an update that is not a LoRA adapter on the task's targets at the task's ranks."""
    modules: dict[str, list[str]] = {}
    for name in tensors:
        suffix = A_SUFFIX if name.endswith(A_SUFFIX) else B_SUFFIX
        module = name.removeprefix(PEFT_PREFIX).removesuffix(suffix)
        if (
            not name.startswith(PEFT_PREFIX)
            or not name.endswith(suffix)
            or not is_target(module + ".weight", tuple(lora.target_modules))
        ):
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"{name[:200]} is no LoRA factor of a target module"
            )
        modules.setdefault(module, []).append(suffix)
    for module, sides in modules.items():
        if len(sides) != 2:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, f"{module[:200]}: unpaired factor")
        a = tensors[PEFT_PREFIX + module + A_SUFFIX]
        b = tensors[PEFT_PREFIX + module + B_SUFFIX]
        r = rank_for(module, lora)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"{module[:200]}: rank is not the task's {r}"
            )


class LayoutVote:
    """Round-1 running aggregates, one per layout sent; the layout most agents sent wins."""

    def __init__(self, make: Callable[[], Aggregator]) -> None:
        self.make = make
        self.by_layout: dict[Signature, Aggregator] = {}

    def admits(self, sig: Signature) -> bool:
        """Whether an update in layout ``sig`` can be held (a known one, or room for one)."""
        return sig in self.by_layout or len(self.by_layout) < MAX_LAYOUTS

    def add(self, sig: Signature, tensors: Mapping[str, torch.Tensor], weight: int) -> None:
        if not self.admits(sig):
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "too many distinct layouts sent")
        self.by_layout.setdefault(sig, self.make()).add(tensors, weight)

    @property
    def count(self) -> int:
        """Updates held, in every layout."""
        return sum(acc.count for acc in self.by_layout.values())

    def winner(self) -> tuple[Signature, Aggregator, int] | None:
        """The layout most updates came in, its aggregate, and how many updates were left
        out; None without any, or when two layouts tie for the most: then nothing is applied
        (a liar's layout must not win a 1:1 split by adding a module, or by dropping one),
        and the next round votes again."""
        if not self.by_layout:
            return None
        ranked = sorted(self.by_layout.items(), key=lambda kv: (-kv[1].count, kv[0]))
        if len(ranked) > 1 and ranked[1][1].count == ranked[0][1].count:
            log.warning(
                "round 1: %d layouts were each sent by %d agents: no layout wins, nothing is "
                "applied this round (the next votes again); set run.model_dir so that the "
                "layout is the model's",
                sum(1 for _, acc in ranked if acc.count == ranked[0][1].count),
                ranked[0][1].count,
            )
            return None
        best_sig, best = ranked[0]
        left_out = sum(acc.count for _, acc in ranked[1:])
        if left_out:
            log.warning("round 1: %d updates in a layout fewer agents sent were left out", left_out)
        return best_sig, best, left_out
