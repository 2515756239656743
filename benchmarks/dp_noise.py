"""How many agents per round client-level DP-FedAvg needs before its noise stops swamping a
LoRA update: the calibrated noise multiplier and the noise-to-clip ratio of the mean, by ε,
rounds and agents per round.

Run: ``python benchmarks/dp_noise.py [--epsilons 1,8] [--rounds 3,100] [--agents 2,10,...]``
(seconds; no model, no training).

edgefed's DP-FedAvg (``aggregator/privacy/dp.py``) clips every agent's adapter change to
‖Δ‖₂ ≤ C and adds N(0, σ²C²) per value to the sum of the n updates of a round, so the mean
carries noise of norm ≈ σ·C·√d / n over d adapter values, against a signal of norm at most C
(agents that agree, each at the clip). The ratio printed is

    noise norm / clip = σ·√d / n,

the noise's size in units of the largest signal the mean can carry: above 1 the round's step is
mostly noise whatever the data says. σ is calibrated by edgefed's own ``dp.calibrate`` (Google's
``dp-accounting``, RDP) so that ``rounds`` rounds reach ε at δ = 10⁻⁵, every agent taking part in
every round (q = 1), which is the scoreboard's setting; sampling a fraction q of a larger
population lowers σ (printed for q = 0.1 as well). d is fedit's adapter: LoRA r = 8 on q, k, v, o.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.privacy import dp
from protocol.methods.slora.sizes import ATTENTION, llama_shapes, lora_bytes, select

MODELS = {
    "SmolLM2-135M": llama_shapes(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3),
    "LLaMA-7B": llama_shapes(hidden=4096, intermediate=11008, layers=32, heads=32),
}


def adapter_values(model: str, r: int = 8) -> int:
    return lora_bytes(select(MODELS[model], ATTENTION), r) // 4


def ratio(sigma: float, d: int, agents: int) -> float:
    return sigma * math.sqrt(d) / agents


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epsilons", default="1,8")
    ap.add_argument("--rounds", default="3,100")
    ap.add_argument("--agents", default="2,10,100,1000,10000,100000")
    ap.add_argument("--fractions", default="1,0.1")
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP orders it skips
    epsilons = [float(x) for x in args.epsilons.split(",")]
    rounds = [int(x) for x in args.rounds.split(",")]
    agents = [int(x) for x in args.agents.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    dims = {m: adapter_values(m) for m in MODELS}
    print("adapter values d (LoRA r=8 on q,k,v,o): "
          + ", ".join(f"{m} {d:,}" for m, d in dims.items()))  # fmt: skip
    print()
    head = " | ".join(f"n={n:,}" for n in agents)
    print(f"| model | ε | rounds | q | σ | {head} |")
    print("|" + "---|" * (5 + len(agents)))
    for model, d in dims.items():
        for eps in epsilons:
            for t in rounds:
                for q in fractions:
                    sigma = dp.calibrate("central", eps, q, t, args.delta)
                    cells = " | ".join(f"{ratio(sigma, d, n):.3g}" for n in agents)
                    print(f"| {model} | {eps:g} | {t} | {q:g} | {sigma:.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
