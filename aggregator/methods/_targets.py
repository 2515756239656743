"""Which weights a list of LoRA target names covers, and their shapes (from safetensors headers
only): shared by the methods that derive an update's expected layout from the task."""

from __future__ import annotations

from pathlib import Path

from aggregator.errors import StateError

Shapes = dict[str, tuple[int, int]]


def is_target(param_name: str, target_modules: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the module name is one, or ends in ``.<one>``."""
    if not param_name.endswith(".weight"):
        return False
    module = param_name.removesuffix(".weight")
    return any(module == t or module.endswith("." + t) for t in target_modules)


def target_shapes(model_dir: Path, target_modules: tuple[str, ...]) -> Shapes:
    """Names and shapes of the 2-D target weights, read from safetensors headers only."""
    from safetensors import safe_open

    shapes: Shapes = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise StateError(f"{model_dir} holds no safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no Mapping)
                shape = tuple(f.get_slice(name).get_shape())
                if is_target(name, target_modules) and len(shape) == 2:
                    shapes[name] = (int(shape[0]), int(shape[1]))
    if not shapes:
        raise StateError(f"no weight in {model_dir} matches the targets {list(target_modules)}")
    return dict(sorted(shapes.items()))
