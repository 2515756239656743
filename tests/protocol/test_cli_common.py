"""The tools end user errors alike (``edgefed-<tool>: ...``, exit 2) and make keys alike."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click
import pytest
import zmq.auth
from click.testing import CliRunner

from aggregator.cli import main as aggregator_cli
from edge_agent.cli import main as agent_cli
from protocol.cli_common import key_file_problems
from protocol.inspect_cli import main as inspect_cli

TOOLS = [("edgefed-aggregator", aggregator_cli), ("edgefed-agent", agent_cli)]


@pytest.mark.parametrize(("tool", "cli"), TOOLS)
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["nonsense"], "No such command 'nonsense'. (see '{tool} --help')"),
        (["keygen", "--dir", "x", "--bogus"], "No such option '--bogus'. (see '{tool} keygen"),
        (["keygen"], "Missing option '--dir'. (see '{tool} keygen --help')"),
        (["config", "check"], "Missing option '--config'. (see '{tool} config check --help')"),
    ],
)
def test_usage_errors_are_one_prefixed_line_and_exit_2(
    tool: str, cli: click.Command, argv: list[str], says: str
) -> None:
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{tool}: " + says.format(tool=tool))
    assert line.endswith(" --help')")
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr


def test_inspect_usage_error_has_its_prefix() -> None:
    result = CliRunner().invoke(inspect_cli, [])
    assert result.exit_code == 2
    assert result.stderr.startswith("edgefed-inspect: Missing argument 'PATH'.")


def test_help_still_exits_0() -> None:
    for _, cli in TOOLS:
        result = CliRunner().invoke(cli, ["keygen", "--help"])
        assert result.exit_code == 0 and "--force" in result.stdout


@pytest.mark.parametrize(("tool", "cli"), TOOLS)
def test_keygen_same_wording_refuses_to_overwrite_unless_force(
    tool: str, cli: click.Command, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    public, secret = keys / "k.key", keys / "k.key_secret"
    old = os.umask(0o022)
    try:
        first = CliRunner().invoke(cli, ["keygen", "--dir", str(keys), "--name", "k"])
    finally:
        os.umask(old)
    assert first.exit_code == 0, first.output
    assert first.stdout == f"public key: {public}\nsecret key: {secret}\n"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    original = zmq.auth.load_certificate(secret)

    again = CliRunner().invoke(cli, ["keygen", "--dir", str(keys), "--name", "k"])
    assert again.exit_code == 2
    assert again.stderr == (
        f"{tool}: {public} exists; not overwriting a key (--force replaces the pair)\n"
    )
    assert zmq.auth.load_certificate(secret) == original

    secret.unlink()  # half a pair is still refused: the public half may be in allow-lists
    half = CliRunner().invoke(cli, ["keygen", "--dir", str(keys), "--name", "k"])
    assert half.exit_code == 2 and f"{public} exists" in half.stderr

    forced = CliRunner().invoke(cli, ["keygen", "--dir", str(keys), "--name", "k", "--force"])
    assert forced.exit_code == 0, forced.output
    replaced = zmq.auth.load_certificate(secret)
    assert replaced[1] is not None and replaced[0] != original[0]
    assert zmq.auth.load_certificate(public) == (replaced[0], None)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    bad = CliRunner().invoke(cli, ["keygen", "--dir", str(keys), "--name", "../k"])
    assert (bad.exit_code, bad.stderr) == (2, f"{tool}: invalid key name '../k'\n")


def test_key_file_problems_say_what_is_wrong(tmp_path: Path) -> None:
    public, secret = zmq.auth.create_certificates(tmp_path, "a")
    assert key_file_problems("f", Path(secret), secret=True) == []
    assert key_file_problems("f", Path(public), secret=False) == []
    assert key_file_problems("f", Path(public), secret=True) == [
        f"f: holds no secret key (a .key_secret file is needed): {public}"
    ]
    missing = tmp_path / "nope.key"
    assert key_file_problems("f", missing, secret=False) == [f"f: missing file: {missing}"]
    short = tmp_path / "short.key"
    short.write_text('curve\n    public-key = "abc"\n')
    assert key_file_problems("f", short, secret=False) == [
        f"f: malformed public key (not 40 Z85 characters): {short}"
    ]
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.key_secret"
        locked.write_bytes(Path(secret).read_bytes())
        locked.chmod(0)
        assert key_file_problems("f", locked, secret=True) == [
            f"f: cannot read (Permission denied): {locked}"
        ]
