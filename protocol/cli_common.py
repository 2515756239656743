"""What the command-line tools share: how a user error ends, key files, the private umask.

Every tool (``edgefed-aggregator``, ``edgefed-agent``, ``edgefed-inspect``) ends a user error
the same way: one ``<tool>: <message>`` line per problem on stderr and exit status
:data:`EXIT_USER_ERROR` (2), never a traceback. That covers click's usage errors (an unknown
option, a missing or bad value: click alone would print ``Error: ...`` after a usage block) and
the tool's own error types, caught by :class:`ToolGroup` around every subcommand.

Both key-making commands are :func:`keygen_command`: the same options, wording and checks
(:func:`write_key_pair`: a missing directory is created 0700, the secret file is 0600 from the
first byte, an existing pair is never overwritten without ``--force``). :func:`key_file_problems`
reads a key file the way the daemons will, so a config check can say what is wrong with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

import click

EXIT_USER_ERROR = 2
Z85_KEY_LENGTH = 40
"""A CURVE key (32 bytes) in the Z85 text of a key file."""
PRIVATE_UMASK = 0o077
"""What ``serve`` and the agent's ``run`` set: keys, state, ledger and logs they create are
readable by their owner only, whatever umask the shell or unit had."""


class KeyFileError(Exception):
    """A key pair that cannot be written (bad name, existing files)."""


def fail(tool: str, message: str) -> NoReturn:
    """Print ``message`` (each of its lines) as ``<tool>: <line>`` on stderr; exit 2."""
    for line in message.splitlines() or ["error"]:
        click.echo(f"{tool}: {line}", err=True)
    sys.exit(EXIT_USER_ERROR)


class _Reported(click.ClickException):
    """A user error, shown as ``<tool>: <line>`` lines by click's own error handling."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.format_message().splitlines() or ["error"]:
            click.echo(f"{self.tool}: {line}", err=True, file=file)


@contextmanager
def reported(tool: str, user_errors: Sequence[type[BaseException]] = ()) -> Iterator[None]:
    """Turn click usage errors and ``user_errors`` raised inside into :class:`_Reported`."""
    try:
        yield
    except _Reported:
        raise
    except click.UsageError as exc:
        hint = f" (see '{_command_path(tool, exc.ctx)} --help')"
        raise _Reported(tool, exc.format_message() + hint) from None
    except click.ClickException as exc:
        raise _Reported(tool, exc.format_message()) from None
    except tuple(user_errors) as exc:
        raise _Reported(tool, str(exc) or type(exc).__name__) from None


def _command_path(tool: str, ctx: click.Context | None) -> str:
    """``tool`` and the subcommands of ``ctx`` (not the program name, which may be ``-m ...``)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join([tool, *reversed(names)])


class ToolGroup(click.Group):
    """A click group whose user errors end as ``<tool>: <message>`` and exit 2.

    ``tool`` is the command's name as typed; ``user_errors`` the exception types that a
    subcommand may let escape as a user's mistake (their message is what the user reads)."""

    def __init__(
        self,
        *args: Any,
        tool: str,
        user_errors: Sequence[type[BaseException]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tool = tool
        self.user_errors = tuple(user_errors)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with reported(self.tool, self.user_errors):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with reported(self.tool, self.user_errors):
            return super().invoke(ctx)


class ToolCommand(click.Command):
    """:class:`ToolGroup` for a tool that is a single command (``edgefed-inspect``)."""

    def __init__(self, *args: Any, tool: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool = tool

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with reported(self.tool):
            return super().make_context(info_name, args, parent, **extra)


@contextmanager
def private_umask() -> Iterator[None]:
    """Run the block under :data:`PRIVATE_UMASK` (restored after)."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def write_key_pair(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write the CURVE pair ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``.

    A missing directory is created 0700. Existing files are kept (:class:`KeyFileError`) unless
    ``force``: an overwritten secret key locks its owner out of every aggregator that allows it.
    """
    import zmq.auth

    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise KeyFileError(f"invalid key name {name!r}")
    public = directory / f"{name}.key"
    secret = directory / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"{existing[0]} exists; not overwriting a key (--force replaces the pair)"
        )
    if directory.exists() and not directory.is_dir():
        raise KeyFileError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with private_umask():  # the secret file is never readable by others, not even briefly
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    Path(secret_file).chmod(0o600)
    Path(public_file).chmod(0o644)
    return Path(public_file), Path(secret_file)


def keygen_command(tool: str, default_name: str, give_to: str) -> click.Command:
    """The ``keygen`` subcommand of ``tool``; ``give_to`` says who gets the public file."""

    @click.command("keygen", help=f"Create a CURVE key pair; give NAME.key to {give_to}.")
    @click.option(
        "--dir",
        "directory",
        type=click.Path(path_type=Path, file_okay=False),
        required=True,
        help="Where to write the pair (created 0700 if missing).",
    )
    @click.option(
        "--name",
        default=default_name,
        show_default=True,
        help="File stem: NAME.key, NAME.key_secret.",
    )
    @click.option("--force", is_flag=True, help="Replace an existing pair of that name.")
    def keygen(directory: Path, name: str, force: bool) -> None:
        try:
            public, secret = write_key_pair(directory, name, force=force)
        except KeyFileError as exc:
            fail(tool, str(exc))
        click.echo(f"public key: {public}")
        click.echo(f"secret key: {secret}")

    return keygen


def key_file_problems(field: str, path: Path, *, secret: bool) -> list[str]:
    """What is wrong with the key file ``path`` named by config ``field`` (nothing: ``[]``).

    ``secret``: the file must hold a secret key (a ``.key_secret`` file), else a public key."""
    import zmq.auth

    if not path.exists():
        return [f"{field}: missing file: {path}"]
    if not path.is_file():
        return [f"{field}: not a file: {path}"]
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except OSError as exc:
        return [f"{field}: cannot read ({exc.strerror or exc}): {path}"]
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{field}: not a CURVE key file ({exc}): {path}"]
    if len(public_key) != Z85_KEY_LENGTH:
        return [f"{field}: malformed public key (not {Z85_KEY_LENGTH} Z85 characters): {path}"]
    if secret and not secret_key:
        return [f"{field}: holds no secret key (a .key_secret file is needed): {path}"]
    if secret_key is not None and len(secret_key) != Z85_KEY_LENGTH:
        return [f"{field}: malformed secret key (not {Z85_KEY_LENGTH} Z85 characters): {path}"]
    return []
