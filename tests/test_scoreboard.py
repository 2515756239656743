"""The scoreboard's arithmetic and its resumability (its --quick run is in test_benchmarks)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scoreboard  # noqa: E402
from _scoreboard_runs import Common, Config, Store  # noqa: E402
from _scoreboard_stats import simulated_round_seconds, stat, summary_table, verdict  # noqa: E402


def test_the_simulated_round_is_the_slowest_agent_with_its_transfer() -> None:
    agents = {
        "agent-1": {"seconds": 10.0, "bytes_up": 5e6, "bytes_down": 5e6},  # 10 MB at 100 Mbit/s
        "agent-2": {"seconds": 4.0, "bytes_up": 2.5e6, "bytes_down": 0.0},  # 2.5 MB at 2 Mbit/s
    }
    bw = {"agent-1": 100.0, "agent-2": 2.0}
    # agent-1: 10 + 0.8 s; agent-2: 4 + 10 s
    assert simulated_round_seconds(agents, bw) == pytest.approx(14.0)
    assert simulated_round_seconds(agents, {"agent-1": 100.0, "agent-2": 100.0}) == pytest.approx(
        10.8
    )


def test_mean_sd_and_verdicts() -> None:
    s = stat([0.30, 0.34, 0.32])
    assert s.mean == pytest.approx(0.32) and s.sd == pytest.approx(0.02) and s.n == 3
    assert s.cell(".2f") == "0.32 ± 0.02"
    assert stat([0.5]).sd is None and stat([math.nan]).n == 0
    close = stat([0.33, 0.35, 0.31])  # gap 0.01 < spread 0.02
    far = stat([0.40, 0.41, 0.42])  # gap 0.09 > spread
    assert verdict(close, s) == "no difference"
    assert verdict(far, s) == "better" and verdict(s, far) == "worse"
    assert verdict(far, s, higher_is_better=False) == "worse"
    assert verdict(stat([0.9]), s) == "not judged (n < 2)"


def _result(method: str, seed: int, rouge: float, group: str | None = None) -> dict[str, Any]:
    rows = [
        {"round": 0, "eval_rouge_l": 0.1, "eval_loss": 3.0, "cum_bytes": 0.0, "sim_seconds": 0.0},
        {"round": 1, "eval_rouge_l": rouge, "eval_loss": 2.0, "eval_em": 0.25,
         "cum_bytes": 2e6, "sim_seconds": 12.0},
    ]  # fmt: skip
    return {"method": method, "seed": seed, "group": group or method, "rows": rows}


def test_the_table_gives_mean_sd_n_and_the_verdict_against_the_reference() -> None:
    results = [_result("fedavg", s, r) for s, r in enumerate((0.30, 0.34, 0.32))]
    results += [_result("fedit", s, r) for s, r in enumerate((0.33, 0.35, 0.31))]
    results += [_result("ferret", s, r) for s, r in enumerate((0.10, 0.11, 0.12))]
    lines = summary_table(results, "fedavg")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines[2:]}
    assert rows["fedit"] == (
        "| fedit | 3 | 0.1000 ± 0.0000 | 0.3300 ± 0.0200 | 2.0000 ± 0.0000 | 0.250 ± 0.000 "
        "| 2.0 ± 0.0 | 12 ± 0 | no difference |"
    )
    assert rows["ferret"].endswith("| worse |") and rows["fedavg"].endswith("| — |")
    assert [ln.split(" | ")[0].strip("| ") for ln in lines[2:]] == ["fedit", "fedavg", "ferret"]


def test_finished_configurations_are_skipped_on_the_next_invocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    failed: list[str] = []

    def fake_run(cfg: Config, common: Common, split: Path, work: Path) -> dict[str, Any]:
        calls.append(cfg.name)
        if cfg.name == "fedit-nf4-lr0.003-s0" and not failed:
            failed.append(cfg.name)
            raise RuntimeError("interrupted")  # a run that dies is retried next time
        rouge = 0.3 if cfg.lr == 0.001 else 0.2
        return _result(cfg.method, cfg.seed, rouge, cfg.group) | {"name": cfg.name, "lr": cfg.lr,
                                                                   "quant": cfg.quant, "wall_seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(scoreboard, "run_config", fake_run)
    monkeypatch.setattr(
        scoreboard, "prepare_split", lambda args, seed, agents=None, alpha=None: tmp_path
    )
    args = argparse.Namespace(
        results=tmp_path, lr_grid="fedit=1e-3,3e-3", methods="fedit", references="",
        seeds="0,1,2", quant="nf4", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01,
    )  # fmt: skip
    common = Common("m", 2, 1, 1, 2, (100.0, 20.0))
    store = Store(tmp_path / "results")
    assert scoreboard.run_all(args, common, store) == {"fedit": 0.001}
    assert calls == ["fedit-nf4-lr0.001-s0", "fedit-nf4-lr0.003-s0", "fedit-nf4-lr0.001-s1",
                     "fedit-nf4-lr0.001-s2"]  # fmt: skip
    calls.clear()
    assert scoreboard.run_all(args, common, store) == {"fedit": 0.001}
    assert calls == ["fedit-nf4-lr0.003-s0"]  # only the one that failed runs again
    assert len(store.load_all()) == 4
    calls.clear()
    scoreboard.run_all(args, common, store)
    assert calls == []


def test_variants_run_every_seed_at_their_methods_chosen_rate_and_get_their_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _scoreboard_rows import SECTIONS, all_variants
    from _scoreboard_runs import local_command

    calls: list[Config] = []

    def fake_run(cfg: Config, common: Common, split: Path, work: Path) -> dict[str, Any]:
        calls.append(cfg)
        rouge = {"": 0.3, "ferret K=32": 0.1}.get(cfg.variant, 0.2)
        rouge += 0.01 * cfg.seed
        return _result(cfg.method, cfg.seed, rouge, cfg.group) | {
            "name": cfg.name, "lr": cfg.lr, "quant": cfg.quant, "variant": cfg.variant,
            "wall_seconds": 1.0,
        }  # fmt: skip

    monkeypatch.setattr(scoreboard, "run_config", fake_run)
    monkeypatch.setattr(
        scoreboard, "prepare_split", lambda args, seed, agents=None, alpha=None: tmp_path
    )
    ferret = next(s for s in SECTIONS if s.key == "ferret")
    args = argparse.Namespace(
        results=tmp_path, lr_grid="ferret=0.05,0.01", methods="fedavg,ferret", references="",
        seeds="0,1", quant="fp32", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01, sections="ferret",
        img_dir=tmp_path / "img", doc=tmp_path / "doc.md",
    )  # fmt: skip
    common = Common("m", 2, 1, 1, 2, (100.0, 20.0))
    chosen = scoreboard.run_all(args, common, Store(tmp_path / "results"))
    assert chosen == {"fedavg": 0.01, "ferret": 0.01}  # equal scores: the smaller rate
    variant_runs = [c for c in calls if c.variant]
    assert {(c.variant, c.seed) for c in variant_runs} == {
        (v.name, s) for v in ferret.variants if not v.retired for s in (0, 1)
    }
    assert all(c.lr == 0.01 and c.method == "ferret" for c in variant_runs)
    assert variant_runs[-1].variant == "ferret K=2048"  # the expensive row runs last
    assert Config("ferret", 1, 0.05, "fp32", "ferret K=2048").name == "ferret_K2048-fp32-lr0.05-s1"

    lines = scoreboard.section_lines(args, Store(tmp_path / "results").load_all(), chosen)
    table = [ln for ln in lines if ln.startswith("| ferret K=32 fp32")]
    # the summary row, the seed-matched row, the reach row (the ferret section has one)
    assert len(table) == 3 and table[0].endswith("| worse |")  # 0.1-0.11 against fedavg's 0.2x
    assert "| 0,1 |" in table[1]  # both seeds shared with fedavg
    assert "| 0 of 2 |" in table[2]  # never reaches fedavg's final Rouge-L on its seed
    assert any(
        ln.startswith("| fedavg fp32 lr=0.01 | 2 |") and ln.endswith("| — |") for ln in lines
    )
    assert not any(ln.startswith("| fedavg fp32 lr=0.05") for ln in lines)  # the unchosen rate

    cmd = local_command(Config("ferret", 0, 0.05, "fp32", "ferret K=2048"), common, tmp_path,
                        tmp_path / "w")  # fmt: skip
    assert cmd[cmd.index("--param") + 1] == "ferret.k=2048"
    assert all_variants()["fedit DP eps=1"].local_args() == ["--dp-epsilon", "1"]


def test_every_variants_params_are_valid_for_its_method() -> None:
    """Each variant's ``--param`` values parse as ``local`` parses them and validate against
    its method's parameters (a typo would fail the run only after the main table)."""
    from _scoreboard_rows import all_variants

    from aggregator.local.options import parse_params as local_params
    from protocol.methods import parse_params

    parsed = {
        name: parse_params(v.method, local_params(list(v.params)))
        for name, v in all_variants().items()
        if not v.retired  # an option measured and removed: its row's results stay
    }
    retired = {name for name, v in all_variants().items() if v.retired}
    assert retired == {"ferret pool=round"}
    off = parsed["fedbiot no alignment"]
    assert off.align.initial_steps == 0 and off.align.steps == 0  # type: ignore[attr-defined]
    once = parsed["fedbiot FedOT align once"]
    assert once.align.initial_steps == 48 and once.align.steps == 0  # type: ignore[attr-defined]
    assert parse_params("fedbiot", {}).align.kl_weight == 0.5  # type: ignore[attr-defined]
    assert parsed["fedbiot KL=0"].align.kl_weight == 0.0  # type: ignore[attr-defined]
    for name in ("fedbiot FedOT align once", "fedbiot drop=0.2", "fedbiot align qkvo r=8"):
        assert parsed[name].align.kl_weight == 0.0  # type: ignore[attr-defined]
    assert parsed["fedbiot drop=0.2"].emulator.drop_ratio == 0.2  # type: ignore[attr-defined]
    assert parsed["fedbiot prox=0"].prox == 0.0  # type: ignore[attr-defined]
    assert parse_params("fedbiot", {}).prox == 0.0  # type: ignore[attr-defined]
    assert parsed["fedbiot prox=1"].prox == 1.0  # type: ignore[attr-defined]
    assert parsed["fedbiot prox=0.1"].prox == 0.1  # type: ignore[attr-defined]
    ablations = ("fedbiot KL=0", "fedbiot no alignment", "fedbiot FedOT align once",
                 "fedbiot drop=0.2", "fedbiot drop=0.35", "fedbiot align qkvo r=8")  # fmt: skip
    for name in ablations:  # run at λ = 1, the default then: pinned
        assert parsed[name].prox == 1.0, name  # type: ignore[attr-defined]
    assert parsed["fedit last 2 layers"].last_layers == 2  # type: ignore[attr-defined]
    qkvo = parsed["fedbiot align qkvo r=8"].align  # type: ignore[attr-defined]
    assert qkvo.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj") and qkvo.r == 8
    assert qkvo.scaling == 2.0
    assert parsed["slora init=random"].sparse.init == "random"  # type: ignore[attr-defined]
    assert len(parsed["fedit all-linear"].lora.target_modules) == 7  # type: ignore[attr-defined]
    slora_qkvo = parsed["slora qkvo LoRA"].lora.target_modules  # type: ignore[attr-defined]
    assert tuple(slora_qkvo) == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_tables_from_a_partial_scoreboard_choose_only_finished_grids(tmp_path: Path) -> None:
    """``--tables-only`` on an interrupted scoreboard: a method whose grid is all on disk gets
    its rate chosen as ``run_all`` would; one with a grid point missing is listed as pending."""
    store = Store(tmp_path / "results")
    for method, lr, rouge in (("fedit", 1e-3, 0.6), ("fedit", 3e-3, 0.5), ("ferret", 0.05, 0.4)):
        cfg = Config(method, 0, lr, "fp32")
        store.save(cfg, _result(method, 0, rouge, cfg.group) | {
            "name": cfg.name, "lr": lr, "quant": "fp32", "variant": "", "wall_seconds": 1.0})  # fmt: skip
    args = argparse.Namespace(
        lr_grid="fedit=3e-3,1e-3;ferret=0.05,0.02", methods="fedit,ferret", references="",
        seeds="0,1", quant="fp32", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01,
    )  # fmt: skip
    chosen = scoreboard.chosen_on_disk(args, store)
    assert chosen == {"fedit": 1e-3}
    pending = scoreboard._pending_lines(args, chosen)
    assert any("ferret" in ln and "fedit" not in ln for ln in pending)


def test_near_iid_rows_train_on_their_own_dirichlet_split_with_the_same_eval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _scoreboard_rows import SECTIONS

    import aggregator.data.cli as data_cli

    made: list[dict[str, Any]] = []

    def fake_prepare(out: Path, **kw: Any) -> dict[str, Any]:
        made.append({"out": out, **kw})
        out.mkdir(parents=True)
        (out / "meta.json").write_text("{}", encoding="utf-8")
        return {}

    monkeypatch.setattr(data_cli, "prepare_natural_instructions", fake_prepare)
    args = argparse.Namespace(
        results=tmp_path, agents=2, tasks="", per_agent=8, eval_examples=4, public=0,
        max_tokens=64, archive=None,
    )  # fmt: skip
    plain = scoreboard.prepare_split(args, 0)
    near_iid = scoreboard.prepare_split(args, 0, None, 100.0)
    assert plain != near_iid and near_iid.name == "seed-0-alpha100"
    assert made[0]["split"] == "task"
    assert (made[1]["split"], made[1]["alpha"]) == ("dirichlet", 100.0)
    assert scoreboard.prepare_split(args, 0, None, 100.0) == near_iid and len(made) == 2  # reused

    seen: list[tuple[str, float | None]] = []
    monkeypatch.setattr(
        scoreboard, "prepare_split",
        lambda args, seed, agents=None, alpha=None: seen.append(("", alpha)) or tmp_path,
    )  # fmt: skip

    def fake_run(cfg: Config, common: Common, split: Path, work: Path) -> dict[str, Any]:
        seen[-1] = (cfg.variant, seen[-1][1])
        return _stored(cfg)

    monkeypatch.setattr(scoreboard, "run_config", fake_run)
    run_args = argparse.Namespace(
        results=tmp_path, lr_grid="", methods="fedavg,fedit,slora", references="", seeds="0",
        quant="fp32", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01, sections="slora",
    )  # fmt: skip
    scoreboard.run_all(run_args, Common("m", 2, 1, 1, 2, (100.0, 20.0)), Store(tmp_path / "r"))
    slora = next(s for s in SECTIONS if s.key == "slora")
    expected = {v.name: v.alpha for v in slora.variants}
    assert {name: alpha for name, alpha in seen if name} == expected
    assert sum(a == 100.0 for a in expected.values()) == 4
    assert all(alpha is None for name, alpha in seen if not name)  # the main rows: by subtask


def test_result_rows_keep_the_slora_switch_metrics_and_drop_other_method_metrics() -> None:
    from _scoreboard_runs import _rows

    table = [
        {"round": 0, "eval_loss": 2.8, "eval_rouge_l": 0.09},
        {
            "round": 3, "bytes_up_per_agent": 10.0, "bytes_down_per_agent": 20.0,
            "eval_loss": 1.4, "train_loss": 1.2, "svd_energy": 0.31, "switch_gain_kept": 0.62,
            "switch_eval_loss": 1.9, "switch_eval_sparse_rouge_l": 0.5, "clip_scale": 1.0,
            "density": 0.01,
        },
    ]  # fmt: skip
    rows = _rows(table, {}, Common("m", 2, 1, 1, 2, (100.0, 20.0)))
    assert rows[1]["switch_gain_kept"] == 0.62 and rows[1]["svd_energy"] == 0.31
    assert rows[1]["switch_eval_loss"] == 1.9 and rows[1]["switch_eval_sparse_rouge_l"] == 0.5
    assert "clip_scale" not in rows[1] and "density" not in rows[1]
    assert rows[1]["cum_bytes"] == 60.0 and rows[1]["train_loss"] == 1.2


def _stored(cfg: Config) -> dict[str, Any]:
    """What a finished run of ``cfg`` stores (Rouge-L 0.2), for a fake ``run_config``."""
    return _result(cfg.method, cfg.seed, 0.2, cfg.group) | {
        "name": cfg.name, "lr": cfg.lr, "quant": cfg.quant, "variant": cfg.variant,
        "wall_seconds": 1.0,
    }  # fmt: skip


def test_the_seed_matched_table_pairs_each_row_with_the_reference_on_shared_seeds() -> None:
    from _scoreboard_stats import paired_table

    def res(group: str, seed: int, rouge: float) -> dict[str, Any]:
        return {"group": group, "seed": seed, "rows": [{"round": 3, "eval_rouge_l": rouge}]}

    results = [
        res("ref", 0, 0.50), res("ref", 1, 0.30), res("ref", 2, 0.40),
        # always 0.05 above on the same seed: the unpaired spread (0.1) would hide it
        res("steady", 0, 0.55), res("steady", 1, 0.35), res("steady", 2, 0.45),
        res("noisy", 0, 0.60), res("noisy", 1, 0.20), res("noisy", 2, 0.45),
        res("one", 1, 0.90),
        res("other", 5, 0.90),
    ]  # fmt: skip
    lines = {line.split(" | ")[0][2:]: line for line in paired_table(results, "ref")[2:]}
    assert set(lines) == {"steady", "noisy", "one", "other"}
    assert (
        "| 0,1,2 | 0.5500 / 0.3500 / 0.4500 | 0.5000 / 0.3000 / 0.4000 | +0.0500 ± 0.0000 "
        "| better | – |" in lines["steady"]  # every gap the same: no spread, no t-test
    )
    # gaps +0.1, -0.1, +0.05: mean 0.0167, sd 0.104, t = 0.277 with 2 degrees of freedom
    assert lines["noisy"].endswith("| no difference | 0.81 |")
    assert lines["one"].endswith("| not judged (n < 2) | – |") and "| 1 |" in lines["one"]
    assert "no shared seed" in lines["other"]
    assert paired_table(results, None) == [] and paired_table(results, "absent") == []
    # the unpaired verdict cannot see the steady gap; the paired one can
    assert verdict(stat([0.55, 0.35, 0.45]), stat([0.50, 0.30, 0.40])) == "no difference"


def test_the_reach_table_gives_the_first_round_at_the_references_final_rouge() -> None:
    from _scoreboard_stats import reach_table

    def res(group: str, seed: int, rouges: list[float], step: float) -> dict[str, Any]:
        rows = [{"round": 0, "eval_rouge_l": 0.9, "sim_seconds": 0.0}]  # round 0 never counts
        rows += [
            {"round": i + 1, "eval_rouge_l": v, "sim_seconds": step * (i + 1)}
            for i, v in enumerate(rouges)
        ]
        return {"group": group, "seed": seed, "rows": rows}

    results = [
        res("ref", 0, [0.2, 0.4, 0.5], 100.0), res("ref", 1, [0.3, 0.5, 0.7], 100.0),
        res("fast", 0, [0.5, 0.6, 0.7], 10.0), res("fast", 1, [0.5, 0.7, 0.7], 10.0),
        res("never", 1, [0.1, 0.2, 0.69], 1.0),
        res("unmatched", 7, [0.9, 0.9, 0.9], 1.0),  # no reference run on seed 7
    ]  # fmt: skip
    lines = {line.split(" | ")[0][2:]: line for line in reach_table(results, "ref")[2:]}
    assert lines["ref"] == "| ref | 2 of 2 | 300 ± 0 | 3.0 ± 0.0 |"
    assert lines["fast"] == "| fast | 2 of 2 | 15 ± 7 | 1.5 ± 0.7 |"  # round 1 on seed 0, 2 on 1
    assert lines["never"] == "| never | 0 of 1 | – | – |"
    assert lines["unmatched"] == "| unmatched | 0 of 0 | – | – |"
    assert reach_table(results, None) == [] and reach_table(results, "absent") == []


def test_variants_option_runs_only_the_named_rows_and_refuses_unknown_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(scoreboard, "prepare_split", lambda *a, **k: tmp_path)

    def fake_run(cfg: Config, common: Common, split: Path, work: Path) -> dict[str, Any]:
        ran.append(cfg.variant)
        return _stored(cfg)

    monkeypatch.setattr(scoreboard, "run_config", fake_run)
    run_args = argparse.Namespace(
        results=tmp_path, lr_grid="", methods="fedit,fedbiot", references="", seeds="0",
        quant="fp32", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01, sections="fedbiot",
        variants="fedbiot drop=0.2,fedit last 2 layers",
    )  # fmt: skip
    common = Common("m", 2, 1, 1, 2, (100.0, 20.0))
    scoreboard.run_all(run_args, common, Store(tmp_path / "r"))
    assert sorted(v for v in ran if v) == ["fedbiot drop=0.2", "fedit last 2 layers"]
    run_args.variants = "fedbiot drop=0.9"
    with pytest.raises(SystemExit, match="no such row"):
        scoreboard.run_all(run_args, common, Store(tmp_path / "r"))
    # a retired row is never run again: not by name, not with its section
    run_args.sections, run_args.methods = "ferret", "ferret"
    run_args.variants = "ferret pool=round"
    with pytest.raises(SystemExit, match="no such row"):
        scoreboard.run_all(run_args, common, Store(tmp_path / "r"))
    ran.clear()
    run_args.variants = ""
    scoreboard.run_all(run_args, common, Store(tmp_path / "r"))
    assert "ferret K=32" in ran and "ferret pool=round" not in ran


def test_a_sections_pairs_judge_a_row_against_its_own_reference(tmp_path: Path) -> None:
    """FedPipe's hetero rows run 3 agents on other links than the section's 2-agent fedit: the
    section also pairs fedpipe hetero with fedit hetero, seed by seed."""
    from _scoreboard_rows import SECTIONS

    fedpipe = next(s for s in SECTIONS if s.key == "fedpipe")
    assert ("fedpipe hetero", "fedit hetero") in fedpipe.pairs
    store = Store(tmp_path / "results")
    for seed in (0, 1, 2):
        for cfg, rouge in (
            (Config("fedit", seed, 0.001, "fp32"), 0.5),
            (Config("fedit", seed, 0.001, "fp32", "fedit hetero"), 0.4 + 0.1 * seed),
            (Config("fedpipe", seed, 0.001, "fp32", "fedpipe hetero"), 0.35 + 0.1 * seed),
        ):
            store.save(cfg, _stored(cfg) | {"rows": _result(cfg.method, seed, rouge)["rows"]})
    args = argparse.Namespace(
        results=tmp_path, quant="fp32", sections="fedpipe", img_dir=tmp_path / "img",
        doc=tmp_path / "doc.md",
    )  # fmt: skip
    lines = scoreboard.section_lines(args, store.load_all(), {"fedit": 0.001})
    header = "Seed-matched, against fedit hetero fp32 lr=0.001 on the seeds both ran"
    at = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    table = lines[at + 2 : lines.index("", at + 2)]
    rows = table[2:]
    assert len(rows) == 1 and rows[0].startswith("| fedpipe hetero fp32 lr=0.001 | 0,1,2 |")
    assert "| -0.0500 ± 0.0000 | worse |" in rows[0]  # 0.05 below on every seed
    # and the section's own tables still judge every row against the 2-agent fedit
    assert any(ln.startswith("Seed-matched, against fedit fp32 lr=0.001") for ln in lines)


def test_pairs_with_one_reference_share_one_table(tmp_path: Path) -> None:
    """SLoRA's near-IID rows are each judged against fedavg on the same near-IID split: one
    table against fedavg alpha=100 with every such row, not one table per row."""
    from _scoreboard_rows import SECTIONS

    slora = next(s for s in SECTIONS if s.key == "slora")
    near_iid = ("fedit alpha=100", "slora alpha=100", "slora init=random alpha=100")
    assert all((row, "fedavg alpha=100") in slora.pairs for row in near_iid)
    store = Store(tmp_path / "results")
    for seed in (0, 1, 2):
        for cfg, rouge in (
            (Config("fedavg", seed, 0.05, "fp32"), 0.5),
            (Config("fedavg", seed, 0.05, "fp32", "fedavg alpha=100"), 0.5),
            (Config("fedit", seed, 0.001, "fp32", "fedit alpha=100"), 0.6),
            (Config("slora", seed, 0.001, "fp32", "slora alpha=100"), 0.4 + 0.1 * seed),
            (Config("slora", seed, 0.001, "fp32", "slora init=random alpha=100"), 0.45),
        ):
            store.save(cfg, _stored(cfg) | {"rows": _result(cfg.method, seed, rouge)["rows"]})
    args = argparse.Namespace(
        results=tmp_path, quant="fp32", sections="slora", img_dir=tmp_path / "img",
        doc=tmp_path / "doc.md",
    )  # fmt: skip
    chosen = {"fedavg": 0.05, "fedit": 0.001, "slora": 0.001}
    lines = scoreboard.section_lines(args, store.load_all(), chosen)
    header = "Seed-matched, against fedavg alpha=100 fp32 lr=0.05 on the seeds both ran"
    assert sum(ln.startswith(header) for ln in lines) == 1
    at = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = lines[at + 2 : lines.index("", at + 2)][2:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| fedit alpha=100 fp32 lr=0.001",
        "| slora alpha=100 fp32 lr=0.001",
        "| slora init=random alpha=100 fp32 lr=0.001",
    ]
    assert "| +0.1000 ± 0.0000 | better |" in rows[0]  # 0.6 against 0.5 on every seed
    assert "| -0.0500 ± 0.0000 | worse |" in rows[2]
    # the SVD initialisation against the random one on the near-IID split, its own table
    svd = "Seed-matched, against slora alpha=100 fp32 lr=0.001 on the seeds both ran"
    assert sum(ln.startswith(svd) for ln in lines) == 1


def test_a_sections_rows_without_all_their_seeds_say_so(tmp_path: Path) -> None:
    """A defined row with no result, or fewer seeds than asked, is marked in the section's
    list of rows instead of silently missing from (or thin in) its table."""
    from _scoreboard_rows import SECTIONS

    ferret = next(s for s in SECTIONS if s.key == "ferret")
    names = [v.name for v in ferret.variants]
    assert "ferret K=32" in names and "ferret K=2048" in names
    store = Store(tmp_path / "results")
    for seed in (0, 1, 2):
        cfg = Config("fedavg", seed, 0.05, "fp32")
        store.save(cfg, _stored(cfg) | {"rows": _result(cfg.method, seed, 0.5)["rows"]})
        cfg = Config("ferret", seed, 0.05, "fp32", "ferret K=32")
        store.save(cfg, _stored(cfg) | {"rows": _result(cfg.method, seed, 0.5)["rows"]})
    for variant in ("ferret secagg", "ferret pool=round"):
        cfg = Config("ferret", 0, 0.05, "fp32", variant)
        store.save(cfg, _stored(cfg) | {"rows": _result(cfg.method, 0, 0.5)["rows"]})
    args = argparse.Namespace(
        results=tmp_path, quant="fp32", sections="ferret", seeds="0,1,2",
        img_dir=tmp_path / "img", doc=tmp_path / "doc.md",
    )  # fmt: skip
    lines = scoreboard.section_lines(args, store.load_all(), {"fedavg": 0.05, "ferret": 0.05})
    bullet = {ln.split("`")[1]: ln for ln in lines if ln.startswith("- `")}
    assert bullet["ferret K=32"] == "- `ferret K=32`: `--param ferret.k=32`"
    assert bullet["ferret K=2048"].endswith(" — **not run yet**")
    assert bullet["ferret secagg"].endswith(" — 1 of 3 seeds so far")
    # a retired row (its option removed after it measured) keeps its results in the table
    assert "the option was removed after this row measured it" in bullet["ferret pool=round"]
    assert any(ln.startswith("| ferret pool=round fp32 lr=0.05 | 1 |") for ln in lines)
    # and the section plots eval loss as well as Rouge-L (per round, byte, simulated second)
    assert any(ln.startswith("![ferret loss](") for ln in lines)
    assert (tmp_path / "img" / "scoreboard-ferret-loss.png").stat().st_size > 0
