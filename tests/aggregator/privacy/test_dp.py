"""Client-level DP-FedAvg: the accountant's numbers, the calibration, the noise scales."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from engine_harness import Harness, assigns, lora_state, start_round

from aggregator.methods import Update
from aggregator.methods.fedit.server import FeditServer
from aggregator.privacy import dp
from aggregator.privacy.config import PrivacySection
from aggregator.privacy.dp_method import DpServer
from edge_agent.privacy.dp import clip_and_noise


def _independent(event: dp_event.DpEvent, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.1, 1.0, 10), (0.8, 0.1, 100), (4.0, 0.5, 3)])
def test_central_epsilon_is_the_subsampled_gaussian_composed(sigma, q, rounds) -> None:
    gaussian = dp_event.GaussianDpEvent(sigma)
    step = gaussian if q == 1.0 else dp_event.PoissonSampledDpEvent(q, gaussian)
    expected = _independent(dp_event.SelfComposedDpEvent(step, rounds), 1e-5)
    assert dp.epsilon("central", sigma, q, rounds, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_local_epsilon_counts_sensitivity_two_c_and_no_sampling() -> None:
    expected = _independent(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.5), 5), 1e-6)
    assert dp.epsilon("local", 3.0, 0.1, 5, 1e-6) == pytest.approx(expected, rel=1e-12)
    # one round of the plain Gaussian mechanism at sigma = 1 is a known landmark: eps ~ 4-5
    assert 3.0 < dp.epsilon("central", 1.0, 1.0, 1, 1e-5) < 6.0


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [dp.epsilon("central", 1.0, 1.0, r, 1e-5) for r in (1, 2, 4, 8)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert dp.epsilon("central", 2.0, 1.0, 4, 1e-5) < eps[2]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_calibration_reaches_the_target_and_no_less_noise_would(mode: str) -> None:
    sigma = dp.calibrate(mode, 8.0, 1.0, 10, 1e-5)
    assert dp.epsilon(mode, sigma, 1.0, 10, 1e-5) <= 8.0
    assert dp.epsilon(mode, sigma * 0.99, 1.0, 10, 1e-5) > 8.0


def test_agent_noise_levels_per_mode() -> None:
    assert dp.agent_noise_std("local", 2.0, 0.5, False, 10) == 1.0
    assert dp.agent_noise_std("central", 2.0, 0.5, False, 10) == 0.0
    # distributed: m shares of variance (σC)²/m sum to (σC)²
    assert dp.agent_noise_std("central", 2.0, 0.5, True, 16) == pytest.approx(0.25)


def test_clipping_bounds_the_change_and_noise_has_the_asked_scale() -> None:
    ref = {"a": torch.zeros(400, 500), "b": torch.ones(100)}
    state = {"a": torch.full((400, 500), 0.01), "b": torch.ones(100) + 3.0}
    norm = math.sqrt(200_000 * 0.01**2 + 100 * 9.0)
    clipped, scale = clip_and_noise(state, ref, 2.0, 0.0)
    assert scale == pytest.approx(2.0 / norm)
    change = torch.cat([(clipped[k] - ref[k]).reshape(-1).double() for k in ref])
    assert float(change.norm()) == pytest.approx(2.0, rel=1e-6)
    same, one = clip_and_noise(state, ref, 100.0, 0.0)
    assert one == 1.0 and torch.allclose(same["b"], state["b"])
    noisy, _ = clip_and_noise(state, ref, 2.0, 0.3)
    noise = noisy["a"].double() - clipped["a"].double()
    assert float(noise.std()) == pytest.approx(0.3, rel=0.01)
    assert abs(float(noise.mean())) < 0.003


def test_central_noise_on_the_mean_is_sigma_c_over_n() -> None:
    privacy = PrivacySection(dp="central", dp_clip=0.5, noise_multiplier=2.0)
    server = DpServer(
        FeditServer({"lora": {"r": 4, "target_modules": ["q_proj"]}}),
        privacy,
        rounds=3,
        fraction=1.0,
    )
    server.begin_round(1)
    big = {"x.lora_A.weight": torch.zeros(300, 400), "x.lora_B.weight": torch.zeros(400, 4)}
    for i in range(4):
        server.add(Update(f"a{i}", f"t{i}", 1, {k: v + i for k, v in big.items()}))
    metrics = server.finish_round(1)
    state, _ = server.state()
    noise = state["x.lora_A.weight"].double() - 1.5  # the mean of 0, 1, 2, 3
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.01)
    assert metrics["dp_epsilon"] == pytest.approx(dp.epsilon("central", 2.0, 1.0, 1, 1e-5))


def test_a_run_stops_before_the_target_epsilon(tmp_path: Path) -> None:
    sigma = 1.5
    target = (
        dp.epsilon("central", sigma, 1.0, 2, 1e-5) + dp.epsilon("central", sigma, 1.0, 3, 1e-5)
    ) / 2
    h = Harness(tmp_path, rounds=6)
    privacy = PrivacySection(dp="central", noise_multiplier=sigma, target_epsilon=target)
    h.engine.method = DpServer(h.method, privacy, rounds=6, fraction=1.0)
    h.engine.method.begin_round(1)
    try:
        tasks = start_round(h, ["a", "b"])
        for _ in range(50):
            for agent, task in tasks.items():
                assert task.params["dp"] == {"clip": 1.0, "noise_std": 0.0}
                h.result(task, agent, 5, lora_state(0.1))
            tasks = assigns(h.tick())
            if h.engine.finished:
                break
        assert h.engine.finished and h.engine.round == 2  # round 3 would pass the target
        eps = [s.method["dp_epsilon"] for s in h.summaries]
        assert eps == pytest.approx([dp.epsilon("central", sigma, 1.0, r, 1e-5) for r in (1, 2)])
    finally:
        h.close()


def test_the_agent_wrapper_sends_its_adapter_clipped_and_noised() -> None:
    from engine_harness import MODEL

    from edge_agent.methods import TaskInput, TaskOutput
    from edge_agent.privacy.secagg_method import SecureClient
    from protocol import payloads
    from protocol.frames import decode, encode
    from protocol.messages import TaskAssign

    reference, trained = lora_state(0.0), lora_state(0.5)

    class Trains:
        name = "fedit"

        def run(self, task: TaskInput, ws: object) -> TaskOutput:
            blob = payloads.encode_lora(trained, method="fedit", round=2)
            return TaskOutput(num_examples=9, metrics={"train_loss": 1.0}, blobs={"update": blob})

    assign = TaskAssign(task_id="t", round=2, method="fedit", model=MODEL,
                        params={"dp": {"clip": 0.25, "noise_std": 0.0}})  # fmt: skip
    blobs = decode(
        encode(assign, {"global": payloads.encode_lora(reference, method="fedit", round=2)})
    ).blobs
    out = SecureClient(Trains()).run(TaskInput(assign, None, blobs), None)  # type: ignore[arg-type]
    sent = payloads.decode(out.blobs["update"]).tensors
    change = torch.cat([(sent[k] - reference[k]).reshape(-1).double() for k in reference])
    assert float(change.norm()) == pytest.approx(0.25, rel=1e-5)
    assert 0 < out.metrics["dp_clip_scale"] < 1 and out.num_examples == 9


def test_central_dp_clips_on_the_server_what_an_agent_did_not() -> None:
    """Central DP without secure aggregation: the server sees each update and clips its change
    (from the global, or in round 1 from the seeded initial adapter) to dp_clip as well. An
    agent that skipped its clip once moved the global by 2.5e5 with C = 1."""
    from protocol import payloads
    from protocol.lora_init import initial_adapter
    from protocol.messages import TaskResult

    privacy = PrivacySection(dp="central", dp_clip=1.0, noise_multiplier=1.0)
    server = DpServer(
        FeditServer({"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}}),
        privacy,
        rounds=3,
        fraction=1.0,
    )
    server.begin_round(1)
    start = initial_adapter({k: tuple(v.shape) for k, v in lora_state(0.0).items()}, 0)
    assert start is not None

    def sent(change: float) -> dict[str, torch.Tensor]:
        tensors = {k: v + change / math.sqrt(2 * v.numel()) for k, v in start.items()}
        blob = payloads.encode_lora(tensors, method="fedit", round=1)
        res = TaskResult(run_id="r", round=1, task_id=f"t{change}", agent_id="a",
                         method="fedit", num_examples=5)  # fmt: skip
        update = server.validate(1, res, {"update": memoryview(blob)})
        return update.tensors

    def norm(tensors: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(((tensors[k].double() - start[k].double()) ** 2).sum())
                             for k in start))  # fmt: skip

    assert norm(sent(0.5)) == pytest.approx(0.5, rel=1e-4)  # within the clip: unchanged
    assert norm(sent(1e6)) == pytest.approx(1.0, rel=1e-4)  # the liar's: clipped to C


def test_the_servers_initial_adapter_is_the_agents(tiny_model_dir: Path) -> None:
    """The round-1 reference the server rebuilds from names and shapes is the adapter every
    agent's peft model starts with, bit for bit."""
    from transformers import AutoModelForCausalLM

    from edge_agent.training.lora import LoraSpec, attach_lora, get_adapter_state
    from protocol.lora_init import initial_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    agent = get_adapter_state(attach_lora(model, spec, init_seed=11))  # what peft holds
    server = initial_adapter({k: tuple(v.shape) for k, v in agent.items()}, 11)
    assert server is not None and set(server) == set(agent)
    assert all(torch.equal(server[k], agent[k]) for k in agent)
