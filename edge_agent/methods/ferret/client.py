"""Ferret client half: full-parameter SGD, projected on seeded bases, sent as coefficients.

The agent keeps its own full-precision copy of the base (``ws.cache``) at the global model of
the last round it was told about. A task first brings it to the task's global round from the
blobs (aggregated coefficients of missed rounds, or dense weights), with the same code and the
same float operations as the aggregator, so the copy stays bit-identical with the server's.
A train task then takes T plain SGD steps (momentum 0, as the reference), projects each
group's update on its seeds, puts the weights back to the global model and sends the triples.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_agent.errors import DataError, PayloadRejected, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import evaluation_task, release_adapter
from edge_agent.training._forward import accepts_logits_to_keep, checkpointing, forward_ce
from edge_agent.training.data import Example, TokenizedExample, collate, tokenize
from protocol import payloads
from protocol.errors import ErrorCode, ProtocolError
from protocol.methods._common import TrainParams
from protocol.methods.ferret import math as fm
from protocol.methods.ferret import spec

log = logging.getLogger(__name__)

CACHE_KEY = "ferret"


class _LayoutMismatch(TaskError):
    code = ErrorCode.MODEL_MISMATCH


@dataclass
class HeldModel:
    """The agent's full model at global round ``round`` of run ``key``."""

    key: str
    model: Any
    tokenizer: Any
    layout: fm.Layout
    tensors: dict[str, torch.Tensor]
    round: int = 0


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name → its data (tied weights once), the tensors Ferret groups and updates."""
    return {name: p.data for name, p in model.named_parameters()}


def held_model(task: TaskInput, ws: Workspace, p: spec.FerretParams) -> HeldModel:
    """This run's full model: the workspace's base, taken over (``Workspace.take_base``: an
    fp32 base loaded from safetensors is a copy-on-write mapping of the file, so only the
    pages training writes become the agent's own memory), or a copy of it."""
    assign = task.assign
    key = f"{assign.run_id}|{assign.model.sha256}|{p.dtype}"
    held: HeldModel | None = ws.cache.get(CACHE_KEY)
    if held is not None and held.key == key:
        return held
    ws.cache.pop(CACHE_KEY, None)
    if assign.quant != p.dtype:
        log.info(
            "ferret trains the unquantized base in %s (the task's quant %s does not apply)",
            p.dtype,
            assign.quant,
        )
    release_adapter(ws)  # the copy must be the plain base, not one wrapped with LoRA
    take = getattr(ws, "take_base", None)
    if callable(take):  # the workspace hands its base over: no second copy of the weights
        model, tokenizer = take(assign.model, p.dtype)
    else:
        base, tokenizer = ws.base(assign.model, p.dtype)
        model = copy.deepcopy(base)
    model.requires_grad_(True)
    tensors = model_tensors(model)
    layout = fm.build_layout({n: tuple(t.shape) for n, t in tensors.items()})
    held = HeldModel(key, model, tokenizer, layout, tensors)
    ws.cache[CACHE_KEY] = held
    log.info(
        "ferret: %d parameters in %d groups (layout %s…)",
        layout.numel,
        len(layout.groups),
        layout.sha256()[:12],
    )
    return held


# --- catching up -------------------------------------------------------------------------------


def sync(
    held: HeldModel, blobs: Mapping[str, memoryview], target: int, p: spec.FerretParams
) -> bool:
    """Bring ``held`` to global round ``target`` from the task's blobs; False if it cannot."""
    steps: list[tuple[int, str]] = []
    for name in blobs:
        rr = spec.step_round(name)
        if rr is not None and 1 <= rr <= target:
            steps.append((rr, name))
        elif name != spec.GLOBAL_BLOB:
            raise PayloadRejected(f"unexpected blob {name!r} in a ferret task for round {target}")
    if spec.GLOBAL_BLOB in blobs:
        _load_dense(held, blobs[spec.GLOBAL_BLOB], target)
    for rr, name in sorted(steps):
        if rr <= held.round:
            continue
        if rr != held.round + 1:
            break
        base_seed = fm.pool_base_seed(p.seed)
        expect = payloads.Expect(
            kind=payloads.PayloadKind.SEEDCOEF,
            method=spec.NAME,
            round=rr,
            base_seed=base_seed,
            k=p.k,
            n_groups=len(held.layout.groups),
        )
        try:
            payload = payloads.decode(blobs[name], expect)
        except ProtocolError as exc:
            raise PayloadRejected(f"step of round {rr} rejected: {exc}") from None
        t = payload.tensors
        fm.apply_step(
            held.tensors,
            held.layout,
            base_seed,
            t["group"],
            t["seed"],
            t["value"],
            server_lr=spec.server_lr_at(p, rr),
            clip_norm=p.clip_norm,
        )
        held.round = rr
    return held.round == target


def _load_dense(held: HeldModel, blob: memoryview, target: int) -> None:
    specs = {n: payloads.TensorSpec(tuple(t.shape), t.dtype) for n, t in held.tensors.items()}
    expect = payloads.Expect(
        kind=payloads.PayloadKind.DENSE, method=spec.NAME, round=target, tensors=specs
    )
    try:
        payload = payloads.decode(blob, expect)
    except ProtocolError as exc:
        raise PayloadRejected(f"global weights rejected: {exc}") from None
    with torch.no_grad():
        for name, tensor in held.tensors.items():
            tensor.copy_(payload.tensors[name])
    held.round = target
    log.info("ferret: loaded the dense global model of round %d", target)


# --- local training ----------------------------------------------------------------------------


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pool: list[int] = []
    while True:
        while len(pool) < batch_size:
            pool += torch.randperm(n, generator=generator).tolist()
        yield pool[:batch_size]
        pool = pool[batch_size:]


def sgd_steps(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    t: TrainParams,
    seed: int,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int], None] = lambda _n: None,
) -> list[float]:
    """``t.steps`` plain SGD steps on every trainable parameter; the losses (mean response CE)."""
    if not examples:
        raise DataError("no training examples")
    data: list[TokenizedExample] = tokenize(examples, tokenizer, t.max_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=0.0, weight_decay=t.weight_decay)
    device = params[0].device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = _batches(len(data), t.batch_size, seed)
    slim = accepts_logits_to_keep(model)  # the LM head only where a response token is predicted
    losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]), checkpointing(model, t.gradient_checkpointing):
        torch.manual_seed(seed)
        for step in range(t.steps):
            if should_stop():
                break
            ids, attention, labels = collate(
                [data[i] for i in next(order)], pad, device, left=False
            )
            loss_sum, count = forward_ce(model, ids, attention, labels, slim)
            loss = loss_sum / count.clamp(min=1)
            if not torch.isfinite(loss):
                raise TaskError(f"training diverged: loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            on_step(len(losses))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return losses


# --- projection --------------------------------------------------------------------------------


def group_delta(
    g: fm.Group, now: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    parts = [(now[m.name].float() - before[m.name].float()).view(-1) for m in g.members]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class Projection:
    """The (group, seed index, γ) triples of an update, sorted, and the update's norm."""

    group: torch.Tensor
    seed: torch.Tensor
    value: torch.Tensor
    update_norm: float


def project_update(
    layout: fm.Layout,
    now: Mapping[str, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    *,
    k: int,
    base_seed: int,
    rng: np.random.Generator,
) -> Projection:
    """Project the update ``now - before`` group by group on ``n_g`` of the round's K bases."""
    with torch.no_grad():
        norms = [
            float(torch.linalg.vector_norm(group_delta(g, now, before))) for g in layout.groups
        ]
        if not all(math.isfinite(x) for x in norms):
            raise TaskError("the local update is not finite")
        counts = fm.seeds_per_group(norms, k)
        groups: list[int] = []
        seeds: list[int] = []
        values: list[float] = []
        for g, n in zip(layout.groups, counts, strict=True):
            chosen = fm.choose_seeds(k, n, rng)
            delta = group_delta(g, now, before)
            keys = [(s, fm.basis_key(base_seed, s, g.name)) for s in chosen]
            values += fm.project(delta, keys, n)
            groups += [g.index] * n
            seeds += chosen
    return Projection(
        torch.tensor(groups, dtype=torch.int32),
        torch.tensor(seeds, dtype=torch.int32),
        torch.tensor(values, dtype=torch.float32),
        math.sqrt(sum(x * x for x in norms)),
    )


def choice_rng(p: spec.FerretParams, round: int, agent_id: str) -> np.random.Generator:
    """The generator of this agent's seed choices in ``round`` (run seed, round, agent id)."""
    return np.random.default_rng(fm.agent_seed(p.seed, round, agent_id, "choose"))


def sgd_seed(params: spec.Params, round: int, agent_id: str) -> int:
    """The seed of this agent's batch order and dropout in ``round``."""
    return fm.agent_seed(params.ferret.seed, round, agent_id, f"sgd{params.train.seed}")


# --- the method --------------------------------------------------------------------------------


class FerretClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        p = params.ferret
        held = held_model(task, ws, p)
        if p.layout is not None and p.layout != held.layout.sha256():
            raise _LayoutMismatch(
                f"this agent's model groups into layout {held.layout.sha256()[:16]}…, the "
                f"aggregator's into {p.layout[:16]}… (parameter names or shapes differ)"
            )
        round_ = task.assign.round
        if task.assign.kind == "eval":
            if not sync(held, task.blobs, round_, p):
                raise TaskError(f"cannot reach global round {round_} from round {held.round}")
            return self._evaluate(held, params, ws)
        if not sync(held, task.blobs, round_ - 1, p):
            log.warning(
                "ferret: at round %d, cannot reach round %d; asking to resync",
                held.round,
                round_ - 1,
            )
            return self._out_of_sync(held, round_, p)
        return self._train(task, held, params, ws)

    def _train(
        self, task: TaskInput, held: HeldModel, params: spec.Params, ws: Workspace
    ) -> TaskOutput:
        p, t = params.ferret, params.train
        round_ = task.assign.round
        before = {n: x.detach().clone() for n, x in held.tensors.items()}
        started = time.perf_counter()
        try:
            losses = sgd_steps(
                held.model,
                held.tokenizer,
                ws.train_examples,
                t,
                sgd_seed(params, round_, task.agent_id),
                should_stop=ws.should_stop,
                on_step=lambda done: ws.report_progress(0.9 * done / t.steps),
            )
            trained = time.perf_counter()
            base_seed = fm.pool_base_seed(p.seed)
            proj = project_update(
                held.layout,
                held.tensors,
                before,
                k=p.k,
                base_seed=base_seed,
                rng=choice_rng(p, round_, task.agent_id),
            )
        finally:
            with torch.no_grad():
                for name, tensor in held.tensors.items():
                    tensor.copy_(before[name])
            del before
        projected = time.perf_counter()
        if not losses:
            raise TaskError("stopped before the first training step")
        blob = payloads.encode_seedcoef(
            proj.group,
            proj.seed,
            proj.value,
            base_seed=base_seed,
            k=p.k,
            n_groups=len(held.layout.groups),
            method=self.name,
            round=round_,
        )
        log.info(
            "round %d: %d SGD steps, loss %.4f → %.4f, %d triples (%d bytes), projection %.1f s",
            round_,
            len(losses),
            losses[0],
            losses[-1],
            proj.value.numel(),
            len(blob),
            projected - trained,
        )
        return TaskOutput(
            num_examples=len(ws.train_examples),
            metrics={
                "train_loss": sum(losses) / len(losses),
                "train_loss_last": losses[-1],
                "steps": float(len(losses)),
                "seconds": projected - started,
                "project_s": projected - trained,
                "triples": float(proj.value.numel()),
                "update_norm": proj.update_norm,
                spec.HELD_ROUND: float(held.round),
            },
            blobs={spec.UPDATE_BLOB: blob},
        )

    def _out_of_sync(self, held: HeldModel, round_: int, p: spec.FerretParams) -> TaskOutput:
        empty = torch.zeros(0, dtype=torch.int32)
        blob = payloads.encode_seedcoef(
            empty,
            empty,
            torch.zeros(0),
            base_seed=fm.pool_base_seed(p.seed),
            k=p.k,
            n_groups=len(held.layout.groups),
            method=self.name,
            round=round_,
        )
        return TaskOutput(
            num_examples=0,
            metrics={spec.HELD_ROUND: float(held.round), spec.OUT_OF_SYNC: 1.0},
            blobs={spec.UPDATE_BLOB: blob},
        )

    def _evaluate(self, held: HeldModel, params: spec.Params, ws: Workspace) -> TaskOutput:
        return evaluation_task(held.model, held.tokenizer, params.eval, ws)


Client = FerretClient
