"""FedBiOT's server-side alignment: the teacher, the alignment steps, the full-model eval.

The full model (fp32, CPU) is the *teacher*: the hidden states entering its first adapter layer
are computed once per public example and cached (its bottom part never changes). The *student*
is the small model built from the bundle exactly as an agent builds it, with LoRA wrappers on
the alignment targets of its emulator layers; alignment trains those factors on
‖t−s‖²/‖t‖² per token (mean over tokens), plus ``kl_weight``·KL(full ‖ student) on the outputs
when asked. The full model's eval loss with the plugged-in adapter runs only its adapter layers,
final norm and LM head over the cached hidden states (exactly the full forward, at the cost of k
layers).

Public data is read and tokenized with the agents' own reader (``edge_agent.training.data``: chat template
when the tokenizer has one, else ``### Instruction``/``### Response``; prompt and response
tokenized apart, labels ``IGNORE_INDEX`` on the prompt).

The bundle and the models it is built from: :mod:`aggregator.methods.fedbiot.bundle`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aggregator.errors import ConfigError
from aggregator.methods.fedbiot.bundle import quiet
from edge_agent.errors import DataError
from edge_agent.training.data import IGNORE_INDEX, TokenizedExample, load_jsonl, tokenize
from protocol.methods.fedbiot import emulator as emu

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


# --- public data --------------------------------------------------------------------------------


def read_public(path: Path, tokenizer: Any, max_len: int) -> list[TokenizedExample]:
    """The public JSONL read and tokenized exactly as agents read and tokenize their data."""
    try:
        samples = tokenize(load_jsonl(path), tokenizer, max_len)
    except DataError as exc:
        raise ConfigError(f"cannot read the public data: {exc}") from None
    if not samples:
        raise ConfigError(f"{path}: the public data has no records")
    return samples


def _pad(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


# --- the teacher and the student ----------------------------------------------------------------


def _tail(full: Any, k: int) -> Any:
    """The full model's last ``k`` layers, final norm and LM head as a model (shared modules)."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(full.config)
    n = config.num_hidden_layers
    config.num_hidden_layers = k
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and key.startswith("layer"):
            setattr(config, key, value[n - k :])
    with init_empty_weights(), quiet():
        tail = AutoModelForCausalLM.from_config(config)
    tail.model.layers = nn.ModuleList(full.model.layers[n - k :])
    tail.model.embed_tokens = full.model.embed_tokens
    tail.model.norm = full.model.norm
    tail.model.rotary_emb = full.model.rotary_emb
    tail.lm_head = full.lm_head
    return tail.eval()


class _Stop(Exception):
    pass


def _hidden_into(body: Any, layer: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """Run ``body`` (a decoder stack) until ``layer``; the hidden states it would receive."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        body(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["h"]


def _logits_and_hidden_into(
    model: Any, layer: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s logits, and the hidden states ``layer`` received on the way: one forward for
    the KL term, which needs both (two forwards ran the emulator twice per alignment step)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        handle.remove()
    return logits, seen["h"]


class _LoraLinear(nn.Module):
    """``base(x) + scaling·x Aᵀ Bᵀ``: the alignment factors on a frozen emulator linear."""

    def __init__(self, base: nn.Linear, r: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.A = nn.Parameter(torch.zeros(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.A), self.B)


# --- the aligner --------------------------------------------------------------------------------


def _pad_hidden(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T, H] hidden states and the [B, T] mask of real positions."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask


@dataclass
class Moments:
    """Adam's state for the alignment factors (β = 0.9, 0.999, ε = 1e-8), kept across rounds."""

    t: int
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    @classmethod
    def zeros(cls, params: Mapping[str, torch.Tensor]) -> Moments:
        return cls(
            0,
            {n: torch.zeros_like(p) for n, p in params.items()},
            {n: torch.zeros_like(p) for n, p in params.items()},
        )

    def copy(self) -> Moments:
        m = {n: t.clone() for n, t in self.m.items()}
        return Moments(self.t, m, {n: t.clone() for n, t in self.v.items()})

    @torch.no_grad()
    def step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        b1, b2 = self.BETAS
        self.t += 1
        for name, p in params.items():
            if p.grad is None:
                continue
            self.m[name].mul_(b1).add_(p.grad, alpha=1 - b1)
            self.v[name].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.EPS))


class Aligner:
    """Teacher cache, student, alignment steps and full-model eval for one run."""

    def __init__(
        self,
        full: Any,
        student: Any,
        plan: emu.EmulatorPlan,
        samples: list[TokenizedExample],
        *,
        holdout: int,
        targets: Mapping[str, tuple[int, int]],
        r: int,
        scaling: float,
        pad_id: int,
    ) -> None:
        if len(samples) <= holdout:
            raise ConfigError(
                f"the public data has {len(samples)} records: too few to align on with "
                f"{holdout} held out (align.holdout)"
            )
        self.full, self.student, self.plan, self.pad_id = full, student, plan, pad_id
        self.samples = samples
        self.train_rows = list(range(len(samples) - holdout))
        self.held_rows = list(range(len(samples) - holdout, len(samples)))
        self.tail = _tail(full, plan.adapter_layers)
        self._orig: dict[str, torch.Tensor] = {}
        self.wrappers: dict[str, _LoraLinear] = {}
        for module in targets:
            parent_name, _, child = module.rpartition(".")
            parent = student.get_submodule(parent_name)
            wrapper = _LoraLinear(getattr(parent, child), r, scaling)
            setattr(parent, child, wrapper)
            self.wrappers[module] = wrapper
        first_adapter = full.model.layers[plan.full_layers - plan.adapter_layers]
        self.teacher: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(0, len(samples), 8):
                ids, mask = self._inputs(range(i, min(i + 8, len(samples))))
                h = _hidden_into(full.model, first_adapter, ids, mask)
                self.teacher += [h[j, : int(mask[j].sum())].clone() for j in range(len(ids))]

    def _inputs(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _pad([self.samples[i].input_ids for i in rows], self.pad_id)
        mask = _pad([[1] * len(self.samples[i].input_ids) for i in rows], 0)
        return ids, mask

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for module, w in self.wrappers.items():
                w.A.copy_(state[f"{module}.A"])
                w.B.copy_(state[f"{module}.B"])

    def _loss(self, rows: Sequence[int], kl_weight: float) -> torch.Tensor:
        """Mean over real tokens of ‖t−s‖²/‖t‖², plus ``kl_weight``·KL(full ‖ student)."""
        ids, mask = self._inputs(rows)
        body = self.student.model
        layer = body.layers[self.plan.n_emulator]
        logits_s: torch.Tensor | None = None
        if kl_weight > 0:  # one forward gives both the hidden states and the logits
            logits_s, s = _logits_and_hidden_into(self.student, layer, ids, mask)
        else:
            s = _hidden_into(body, layer, ids, mask)
        t, _ = _pad_hidden([self.teacher[i] for i in rows])
        valid = mask.bool()
        per_token = (t - s).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        loss = per_token[valid].mean()
        if logits_s is not None:
            with torch.no_grad():
                logits_t = self.tail(inputs_embeds=t, attention_mask=mask, use_cache=False).logits
            log_t = F.log_softmax(logits_t[valid].float(), -1)
            log_s = F.log_softmax(logits_s[valid].float(), -1)
            loss = loss + kl_weight * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        return loss

    def train(
        self,
        state: Mapping[str, torch.Tensor],
        moments: Moments | None,
        *,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        kl_weight: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], Moments]:
        """``steps`` Adam steps on the alignment factors from ``state``, continuing ``moments``
        (None: fresh); the trained factors and the moments after them.

        The batch order is seeded by ``seed`` and the moments are part of the server's state, so
        a restarted server recomputes an interrupted alignment identically, and each round's
        session continues the previous one instead of restarting Adam's large first steps.
        """
        self.load_state(state)
        params = {f"{m}.{x}": getattr(w, x) for m, w in self.wrappers.items() for x in ("A", "B")}
        adam = moments.copy() if moments is not None else Moments.zeros(params)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for p in params.values():
            p.requires_grad_(True)
        try:
            for _ in range(steps):
                if len(order) < batch_size:
                    perm = torch.randperm(len(self.train_rows), generator=generator).tolist()
                    order += [self.train_rows[i] for i in perm]
                picked, order = order[:batch_size], order[batch_size:]
                for p in params.values():
                    p.grad = None
                self._loss(picked, kl_weight).backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                adam.step(params, lr)
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
        return {n: p.detach().clone() for n, p in params.items()}, adam

    @torch.no_grad()
    def held_loss(self, state: Mapping[str, torch.Tensor], batch_size: int = 8) -> float:
        """The hidden-state loss of the emulator at ``state`` on the held-out public examples."""
        self.load_state(state)
        total, count = 0.0, 0
        for i in range(0, len(self.held_rows), batch_size):
            rows = self.held_rows[i : i + batch_size]
            n = sum(len(self.samples[r].input_ids) for r in rows)
            total += float(self._loss(rows, 0.0)) * n
            count += n
        return total / max(count, 1)

    # --- the adapter on the full model ---------------------------------------------------------

    @torch.no_grad()
    def set_adapter(self, state: Mapping[str, torch.Tensor], alpha: float) -> None:
        """Merge the global adapter (full-model peft names) into the full model's adapter layers
        and the student's (for the KL term): ``W = W0 + alpha/r · B@A`` per module."""
        small_of = self.plan.full_to_adapter()
        for name, a in state.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name[: -len(".lora_A.weight")]
            delta = (state[f"{module}.lora_B.weight"].double() @ a.double()) * (alpha / a.shape[0])
            full_module = module.removeprefix(PEFT_PREFIX)
            for model, path in (
                (self.full, full_module),
                (self.student, emu.renamed(full_module, small_of)),
            ):
                weight = model.get_submodule(path).weight
                key = f"{id(model)}:{path}"
                original = self._orig.setdefault(key, weight.detach().clone())
                weight.copy_((original.double() + delta).to(weight.dtype))

    @torch.no_grad()
    def full_eval(self, batch_size: int = 8) -> float:
        """Response-token cross-entropy of the full model (with the merged adapter) on the
        held-out public examples, token-weighted, as agents compute ``eval_loss``."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for i in range(0, len(self.held_rows), batch_size):
            rows = self.held_rows[i : i + batch_size]
            h, mask = _pad_hidden([self.teacher[r] for r in rows])
            labels = _pad([self.samples[r].labels for r in rows], IGNORE_INDEX)
            out = self.tail.model(inputs_embeds=h, attention_mask=mask, use_cache=False)
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            if not keep.any():
                continue
            logits = self.tail.lm_head(out.last_hidden_state[:, :-1][keep])
            total += F.cross_entropy(logits.float(), targets[keep], reduction="sum").double()
            count += int(keep.sum())
        return float(total / count) if count else math.nan
