"""Natural Instructions v1, read straight out of the ``bigbench`` 1.0.0 source archive.

The archive (``bigbench-1.0.0.tar.gz`` on PyPI, Apache-2.0, 358,249,635 bytes) holds 61
subtasks under ``bigbench/benchmark_tasks/natural_instructions/subtaskNNN_<name>/task.json``.
Each ``task.json`` is one object with ``name``, ``task_prefix`` (the task's definition, things
to avoid and a prompt line: the instruction every example of the task shares) and
``examples``, a list of ``{"input": str, "target": [str, ...]}`` (one or more reference
answers). The package itself is never installed (it pulls tensorflow): :func:`archive_path`
downloads the archive once into the data cache, checks its sha256, and :func:`read_subtasks`
opens it with :mod:`tarfile` and parses only the members asked for.

The data cache is ``$EDGEFED_DATA_CACHE`` if set, else ``~/.cache/edgefed/data`` (beside the
model cache, ``~/.cache/edgefed/models``). ``pip download --no-deps bigbench==1.0.0`` cannot
fetch it (pip builds the sdist's metadata, which declares a direct-URL dependency and fails),
so the file is fetched from PyPI's file host by its pinned address and hash; a copy placed
in the cache by hand is used as is once its hash matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.errors import ConfigError

log = logging.getLogger(__name__)

ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
ARCHIVE_URL = (
    "https://files.pythonhosted.org/packages/95/f8/"
    "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
)
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_MEMBER = re.compile(
    r"^[^/]+/bigbench/benchmark_tasks/natural_instructions/(subtask\d{3}_[^/]+)/task\.json$"
)
_MAX_TASK_BYTES = 64 * 2**20  # the largest real task.json is a few MB


@dataclass(frozen=True)
class Subtask:
    """One Natural Instructions subtask: its instruction and its (input, references) examples."""

    name: str
    """The folder name, e.g. ``subtask047_misc_answering_science_questions``."""
    instruction: str
    examples: tuple[tuple[str, tuple[str, ...]], ...]


def data_cache_dir() -> Path:
    """``$EDGEFED_DATA_CACHE`` if set, else ``~/.cache/edgefed/data``."""
    env = os.environ.get("EDGEFED_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgefed" / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def archive_path(cache: Path | None = None, *, download: bool = True) -> Path:
    """The verified archive in ``cache``, downloading it there the first time."""
    cache = (cache or data_cache_dir()).expanduser()
    target = cache / ARCHIVE_NAME
    if target.is_file():
        return target
    if not download:
        raise ConfigError(f"{target} is missing (download it from {ARCHIVE_URL})")
    cache.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    log.info("downloading %s into %s (358 MB, once)", ARCHIVE_NAME, cache)
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=60) as response, part.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot download {ARCHIVE_URL} ({exc}); put {ARCHIVE_NAME} into {cache} by hand"
        ) from None
    got = _sha256(part)
    if got != ARCHIVE_SHA256:
        part.unlink(missing_ok=True)
        raise ConfigError(f"{ARCHIVE_NAME} downloaded with sha256 {got}, expected {ARCHIVE_SHA256}")
    part.replace(target)
    return target


def read_subtasks(archive: Path, names: Iterable[str] | None = None) -> dict[str, Subtask]:
    """Parse the subtasks ``names`` (all 61 when None) out of ``archive``, keyed by name.

    A name may be given whole (``subtask047_misc_answering_science_questions``) or by its
    number (``subtask047`` or ``47``). Unknown names end in one :class:`ConfigError` listing
    them; a member that is not the expected JSON names the member.
    """
    wanted = None if names is None else {_number(n): n for n in names}
    found: dict[str, Subtask] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if match is None or not member.isfile():
                    continue
                name = match.group(1)
                if wanted is not None and _number(name) not in wanted:
                    continue
                if member.size > _MAX_TASK_BYTES:
                    raise ConfigError(f"{archive}: {member.name} is {member.size} bytes, too big")
                f = tar.extractfile(member)
                if f is None:
                    continue
                found[name] = _parse(name, f.read(), f"{archive}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"{archive}: cannot read the archive ({exc})") from None
    if wanted is not None:
        have = {_number(n) for n in found}
        missing = [given for number, given in wanted.items() if number not in have]
        if missing:
            raise ConfigError(
                f"no Natural Instructions subtask {', '.join(map(repr, missing))} in {archive}"
            )
    if not found:
        raise ConfigError(f"{archive}: no natural_instructions/subtask*/task.json inside")
    return dict(sorted(found.items()))


def in_order(names: Iterable[str], subtasks: dict[str, Subtask]) -> list[Subtask]:
    """The subtasks ``names`` (whole names or numbers) in the order given."""
    by_number = {_number(name): task for name, task in subtasks.items()}
    return [by_number[_number(name)] for name in names]


def _number(name: str) -> str:
    match = re.match(r"^(?:subtask)?0*(\d{1,3})(?:_.*)?$", name.strip())
    if match is None:
        raise ConfigError(f"{name!r} is not a subtask name (e.g. subtask047 or 47)")
    return match.group(1)


def _parse(name: str, raw: bytes, where: str) -> Subtask:
    try:
        task: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise ConfigError(f"{where}: expected an object with an 'examples' list")
    prefix = task.get("task_prefix", "")
    if not isinstance(prefix, str):
        raise ConfigError(f"{where}: 'task_prefix' must be a string")
    examples: list[tuple[str, tuple[str, ...]]] = []
    for i, ex in enumerate(task["examples"]):
        text = ex.get("input") if isinstance(ex, dict) else None
        target = ex.get("target") if isinstance(ex, dict) else None
        refs = [target] if isinstance(target, str) else target
        if (
            not isinstance(text, str)
            or not isinstance(refs, list)
            or not refs
            or not all(isinstance(r, str) for r in refs)
        ):
            raise ConfigError(f"{where}: examples[{i}] needs 'input' (string) and 'target'")
        refs = [r.strip() for r in refs if r.strip()]
        if text.strip() and refs:
            examples.append((text.strip(), tuple(refs)))
    return Subtask(name=name, instruction=prefix.strip(), examples=tuple(examples))
