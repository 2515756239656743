"""What travels to a GPU machine for ``gpu_check.py``: wheels and the embedded model's tokenizer.

The GPU machine has Python 3.12 with a CUDA torch, transformers, peft, safetensors and numpy,
but not pyzmq, pydantic, click, psutil, bitsandbytes, cryptography, dp-accounting or
rouge-score (the service imports the first two of those three, the agents' eval the last),
nothing can be fetched there, and at most 64 MiB of files travel with a run. :func:`prepare`
(run here, with PyPI reachable) writes a bundle folder:

    BUNDLE/wheels/*.whl        cp312 manylinux wheels, pinned to this venv's versions (--no-deps)
    BUNDLE/model/              the embedded model's tokenizer files and config.json (no weights)

About 58 MB in all (57,659,272 B on 2026-12-04; bitsandbytes 0.50.2 alone is 43 MB). scipy
(35 MB) and gguf are left out: the check solves FedPipe's plan exhaustively when scipy is
missing, and builds its models from ``config.json`` with random weights instead of converting
the embedded GGUF.

:func:`install` (run there) unpacks each wheel into ``SITE`` with :mod:`zipfile` (no pip, no
network): a wheel is a zip of what goes into site-packages, compiled extensions included.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {
    # distribution name -> what it is needed for on the GPU machine
    "pyzmq": "the local run (sockets)",
    "pydantic": "the local run, Ferret's reconstruction (protocol messages and specs)",
    "pydantic_core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "click": "the CLIs (edgefed-agent profile, edgefed-aggregator local)",
    "psutil": "the agent's profile",
    "bitsandbytes": "int8 and NF4 bases",
    "cryptography": "the service (secure aggregation's primitives are imported with it)",
    "cffi": "cryptography",
    "pycparser": "cffi",
    "dp-accounting": "the service (the DP accountant is imported with it)",
    "dm-tree": "dp-accounting",
    "nltk": "rouge-score",
}
SOURCE_ONLY = {
    # published as an sdist alone: built into a wheel here (pure Python)
    "rouge-score": "the agents' eval (Rouge-L)",
}
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
LIMIT = 64 * 2**20


def prepare(bundle: Path, *, python_version: str = "3.12") -> int:
    """Download the wheels and copy the tokenizer into ``bundle``; print the sizes."""
    from edge_agent.model.store import DEFAULT_MODEL, resolve_model

    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    abi = "cp" + python_version.replace(".", "")
    platforms = [
        "manylinux2014_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_28_x86_64",
    ]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "--abi", abi]
    cmd += [arg for p in platforms for arg in ("--platform", p)]
    cmd += ["-d", str(wheels), *pins]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)
    built = [f"{name}=={importlib.metadata.version(name)}" for name in SOURCE_ONLY]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), *built]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)
    model = bundle / "model"
    model.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model(DEFAULT_MODEL).path)
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, model / name)
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>12,}  {p.relative_to(bundle)}")
    print(f"{total:>12,}  in all ({total / 2**20:.1f} MiB; a run carries at most 64 MiB)")
    if total > LIMIT:
        print("too large for one run: drop a wheel (bitsandbytes is 43 MB)")
        return 1
    return 0


def install(bundle: Path, site: Path) -> list[str]:
    """Unpack every wheel of ``bundle/wheels`` into ``site`` (once); the wheels unpacked."""
    done = []
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        marker = site / f".{wheel.name}.unpacked"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
            marker.touch()
        done.append(wheel.name)
    return done
