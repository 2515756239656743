"""FedBiOT's server-side model work: the bundle, the teacher, the alignment, the full-model eval.

The full model (fp32, CPU) is the *teacher*: the hidden states entering its first adapter layer
are computed once per public example and cached (its bottom part never changes). The *student*
is the small model built from the bundle exactly as an agent builds it, with LoRA wrappers on
the alignment targets of its emulator layers; alignment trains those factors on
‖t−s‖²/‖t‖² per token (mean over tokens), plus ``kl_weight``·KL(full ‖ student) on the outputs
when asked. The full model's eval loss with the plugged-in adapter runs only its adapter layers,
final norm and LM head over the cached hidden states (exactly the full forward, at the cost of k
layers).

Public data is read and tokenized the way agents format training data (``edge_agent.data``: chat
template when the tokenizer has one, else ``### Instruction``/``### Response``; prompt and response
tokenized apart, labels -100 on the prompt); a test checks that both give the same ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aggregator.errors import ConfigError
from protocol.methods import _fedbiot_emulator as emu

log = logging.getLogger(__name__)

IGNORE = -100
PEFT_PREFIX = "base_model.model."


# --- public data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    labels: list[int]


def _render(record: Mapping[str, Any], tokenizer: Any) -> tuple[str, str, bool]:
    """(prompt, response, add special tokens to the prompt), as ``edge_agent.data.render``."""
    eos = tokenizer.eos_token or ""
    if "text" in record:
        return "", str(record["text"]) + eos, True
    if "messages" in record:
        turns = [dict(t) for t in record["messages"]]
        prompt_turns, response = turns[:-1], str(turns[-1]["content"])
    else:
        extra = record.get("input")
        instruction = str(record["instruction"])
        text = f"{instruction}\n\n{extra}" if extra and str(extra).strip() else instruction
        prompt_turns, response = [{"role": "user", "content": text}], str(record["output"])
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            prompt_turns, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [*prompt_turns, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :], False
        return prompt, response + eos, False
    parts = []
    for turn in prompt_turns:
        if turn["role"] == "system":
            parts.append(f"{turn['content']}\n\n")
        elif turn["role"] == "user":
            parts.append(f"### Instruction:\n{turn['content']}\n\n")
        else:
            parts.append(f"### Response:\n{turn['content']}\n\n")
    return "".join(parts) + "### Response:\n", response + eos, True


def read_public(path: Path, tokenizer: Any, max_len: int) -> list[Sample]:
    """The public JSONL as token ids and labels (prompt masked), cut as agents cut."""
    samples: list[Sample] = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the public data ({exc})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt, response, special = _render(json.loads(line), tokenizer)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}:{lineno}: not a training record ({exc})") from None
        p = [int(i) for i in tokenizer(prompt, add_special_tokens=special)["input_ids"]]
        p = p if prompt or special else []
        r = [int(i) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
        if len(p) + len(r) > max_len:
            keep = min(len(p), max(max_len - len(r), max_len // 2))
            p, r = p[len(p) - keep :], r[: max_len - keep]
        samples.append(Sample(ids=p + r, labels=[IGNORE] * len(p) + r))
    if not samples:
        raise ConfigError(f"{path}: the public data has no records")
    return samples


def _pad(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


# --- models -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(bundle.config)
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with init_empty_weights(), _quiet():
        model = AutoModelForCausalLM.from_config(config)
    weights = {n: t.to(torch.float32) for n, t in bundle.tensors.items()}
    result = model.load_state_dict(weights, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if result.unexpected_keys or set(result.missing_keys) - ({"lm_head.weight"} if tied else set()):
        raise ConfigError(f"emulator bundle does not fit its config: {result}")
    model.tie_weights()
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()


def load_full(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _tail(full: Any, k: int) -> Any:
    """The full model's last ``k`` layers, final norm and LM head as a model (shared modules)."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(full.config)
    n = config.num_hidden_layers
    config.num_hidden_layers = k
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == n and key.startswith("layer"):
            setattr(config, key, value[n - k :])
    with init_empty_weights(), _quiet():
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
