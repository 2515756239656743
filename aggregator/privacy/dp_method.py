"""Client-level DP-FedAvg around a server method (fedit): clip and noise, ε per round, stop.

:class:`DpServer` tells each training task the clip bound and the noise the agent adds itself
(``params["dp"]``, :mod:`protocol.privacy`), counts every update with weight 1 (DP-FedAvg's
equal weights, so one agent's influence is bounded by the clip), adds the central noise to the
new global when no agent did, and reports ``dp_epsilon`` (at the run's δ) after every round.
:meth:`DpServer.should_stop` ends the run before a round that would take ε past the target.
The math and the accountant are in :mod:`aggregator.privacy.dp`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.methods import AgentView, Assignment, ServerMethod, Update
from aggregator.privacy import dp
from aggregator.privacy.config import PrivacySection
from protocol.lora_init import initial_adapter
from protocol.messages import TaskResult

log = logging.getLogger(__name__)


class DpServer:
    """A server method whose rounds are client-level differentially private."""

    def __init__(
        self, inner: ServerMethod, privacy: PrivacySection, *, rounds: int, fraction: float
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.mode = privacy.dp
        self.clip = privacy.dp_clip
        self.delta = privacy.delta
        self.q = fraction
        self.secure = privacy.secure_aggregation
        self.target = privacy.target_epsilon
        sigma = privacy.noise_multiplier
        if sigma is None:
            assert self.target is not None  # config check: one of the two is set
            sigma = dp.calibrate(self.mode, self.target, self.q, rounds, self.delta)
            log.info(
                "DP: noise multiplier %.4f reaches ε=%g after %d rounds", sigma, self.target, rounds
            )
        self.sigma = sigma
        self._agents = 1
        self._counted = 0
        self._round = 0

    def epsilon(self, rounds: int) -> float:
        """ε at the run's δ after ``rounds`` noisy rounds."""
        return dp.epsilon(self.mode, self.sigma, self.q, rounds, self.delta)

    # --- the hooks the DP adds ---------------------------------------------------------------

    def should_stop(self, round: int) -> bool:
        """True when running training round ``round`` would take ε past the target."""
        if self.target is None:
            return False
        over = self.epsilon(round) > self.target * (1 + 1e-9)
        if over:
            log.warning(
                "DP: round %d would reach ε=%.3f, past the target %g; stopping",
                round, self.epsilon(round), self.target,
            )  # fmt: skip
        return over

    def plan(self, round: int, kind: str, views: Mapping[str, AgentView]) -> None:
        if kind == "train":
            self._agents = len(views)
        inner_plan = getattr(self.inner, "plan", None)
        if inner_plan is not None:
            inner_plan(round, kind, views)

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        base = self.inner.assign(round, agent_id, kind)
        if kind != "train":
            return base
        std = dp.agent_noise_std(self.mode, self.sigma, self.clip, self.secure, self._agents)
        entry = {"clip": self.clip, "noise_std": std}
        return Assignment({**base.params, "dp": entry}, base.blobs, base.quant)

    def begin_round(self, round: int) -> None:
        self._round, self._counted = round, 0
        self.inner.begin_round(round)

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        update = self.inner.validate(round, result, blobs)
        update.num_examples = 1  # equal weights: the clip bounds each agent's share
        if self.mode == "central" and not self.secure:
            update.tensors = self._clipped(update)
        return update

    def _clipped(self, update: Update) -> dict[str, torch.Tensor]:
        """The update with its change from the global clipped to ``dp_clip`` here as well:
        central DP's guarantee rests on that bound, and an agent that skips its clip would
        otherwise own the mean (an honest agent's update is within it: unchanged). The change
        is from the global the task carried, or in round 1 from the seeded initial adapter
        every agent builds (rebuilt here from the update's names and shapes)."""
        tensors = dict(update.tensors)
        reference: Mapping[str, torch.Tensor] | None = getattr(self.inner, "global_state", None)
        if not reference:
            lora = getattr(getattr(self.inner, "params", None), "lora", None)
            seed = getattr(lora, "init_seed", None)
            shapes = {n: tuple(t.shape) for n, t in tensors.items()}
            reference = initial_adapter(shapes, seed) if isinstance(seed, int) else None
        if not reference or set(reference) != set(tensors):
            return tensors
        names = sorted(tensors)
        delta = {n: tensors[n].to(torch.float64) - reference[n].to(torch.float64) for n in names}
        norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
        if norm <= self.clip * (1 + 1e-6):
            return tensors
        scale = self.clip / norm
        log.warning(
            "DP: %s's update changed the global by %.4g, beyond dp_clip %g: clipped here",
            update.agent_id,
            norm,
            self.clip,
        )
        update.metrics["dp_server_clip_scale"] = scale
        return {
            n: (reference[n].to(torch.float64) + delta[n] * scale).to(tensors[n].dtype)
            for n in names
        }

    def add(self, update: Update) -> None:
        self.inner.add(update)
        self._counted += 1

    def finish_round(self, round: int) -> dict[str, float]:
        metrics = self.inner.finish_round(round)
        if self.mode == "central" and not self.secure and self._counted:
            self._add_central_noise(self.sigma * self.clip / self._counted)
        return {
            **metrics,
            "dp_epsilon": self.epsilon(round),
            "dp_noise_multiplier": self.sigma,
            "dp_delta": self.delta,
        }

    def _add_central_noise(self, std: float) -> None:
        tensors, meta = self.inner.state()
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        noisy = {}
        for name in sorted(tensors):
            value = tensors[name]
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
            noisy[name] = (value.to(torch.float64) + noise).to(value.dtype)
        self.inner.restore(noisy, meta)
        log.info("DP: central noise std %.3g added to the mean of %d updates", std, self._counted)

    # --- everything else is the wrapped method's ---------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.inner.state()

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.inner.restore(tensors, meta)

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        return self.inner.export(out_dir, base_model_name=base_model_name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)
