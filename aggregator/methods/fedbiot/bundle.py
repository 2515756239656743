"""FedBiOT's server-side model files: the base model's config and shapes, the emulator bundle,
and the models built from them.

The bundle holds the emulator's tensors cut from the base model's safetensors (read by name, in
the bundle's dtype) with the small model's config; ``build_small`` builds the small model from a
bundle exactly as an agent does, and ``load_full`` loads the base model (fp32, CPU, frozen) that
is both the alignment's teacher and the model the global adapter plugs into.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import ConfigError
from protocol.errors import PayloadMismatch
from protocol.methods.fedbiot import emulator as emu


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Transformers' progress bars off while models load (back on after, if they were on)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def full_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the base model and its shape, from the safetensors headers."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors weights (fedbiot needs run.model_dir)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no Mapping)
                shapes[name] = tuple(int(d) for d in f.get_slice(name).get_shape())
    return shapes


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir}: cannot read config.json ({exc})") from None
    return config


def build_bundle(
    model_dir: Path, plan: emu.EmulatorPlan, dtype: str, base_sha256: str
) -> tuple[bytes, int, int]:
    """The bundle's bytes, the full model's parameter count and the small model's."""
    from safetensors import safe_open

    config = read_config(model_dir)
    shapes = full_shapes(model_dir)
    tied = bool(config.get("tie_word_embeddings", False))
    names = emu.bundle_names(shapes, plan, tied=tied)
    wanted = {full: small for small, full in names.items()}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if name in wanted:
                    tensors[wanted[name]] = f.get_tensor(name).to(emu.DTYPES[dtype]).contiguous()
    full = emu.param_count(s for n, s in shapes.items() if not (tied and n == "lm_head.weight"))
    small = emu.param_count(tuple(t.shape) for t in tensors.values())
    data = emu.encode_bundle(tensors, emu.small_config(config, plan), plan, base_sha256)
    return data, full, small


def build_small(bundle: emu.Bundle) -> Any:
    """The small model of a bundle, fp32 on CPU, frozen (as the agent builds it)."""
    try:
        with quiet():
            return emu.build_small(bundle, torch.float32).eval()
    except PayloadMismatch as exc:
        raise ConfigError(str(exc)) from None


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_full(model_dir: Path) -> Any:
    """The base model in fp32 on CPU, frozen: the teacher and the model the adapter plugs into."""
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()
