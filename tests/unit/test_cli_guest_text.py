"""Guest-made text (agent errors, console tails) reaches the operator's terminal defanged.

An escape sequence in an error message would otherwise let a guest retitle the terminal,
write the clipboard (OSC 52) or ask it questions whose answers land on the user's input.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_support import invoke
from virtcontainers.agent.client import AgentError
from virtcontainers.cli import console
from virtcontainers.cli.app import report_error
from virtcontainers.errors import LaunchError

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x1b\\"  # "write this to the clipboard", ST-terminated
TITLE = "\x1b]0;pwned\x07"
CSI_QUERY = "\x1b[6n"
HOSTILE = f"exec failed: {OSC52}{TITLE}{CSI_QUERY}\u009b31m"


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize(
    "exc",
    [
        AgentError(HOSTILE),
        LaunchError(f"qemu exited with code 1\nconsole tail:\n{HOSTILE}\n"),
    ],
)
def test_errors_print_guest_text_without_control_characters(
    capfd: pytest.CaptureFixture[str], exc: Exception, debug: bool
) -> None:
    try:
        raise exc
    except Exception as e:
        report_error(e, debug)
    printed = capfd.readouterr().err
    assert "\x1b" not in printed and "\x07" not in printed and "\x9b" not in printed
    if debug or isinstance(exc, AgentError):  # a launch error's tail shows with --debug
        assert "^[]52;c;cm0gLXJmIH4K^[\\" in printed  # shown, visibly


def test_console_history_is_shown_without_control_characters(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(f"boot\r\n{HOSTILE}\r\nlogin: ".encode())
    console._show_tail(str(log))
    shown = capfd.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown
    assert shown.startswith("boot\r\nexec failed: ^[]52") and shown.endswith("login: ")


def test_factory_status_shows_the_last_failure_without_control_characters(
    monkeypatch: pytest.MonkeyPatch, run_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtcontainers import factory
    from virtcontainers.factory.base import FactoryStatus

    async def status(root: str | None = None) -> FactoryStatus:
        return FactoryStatus(base="template t", pid=os.getpid(), size=1, last_error=HOSTILE)

    monkeypatch.setattr(factory, "daemon_status", status)
    res = invoke(capsys, "factory", "status")
    assert res.code == 0, res.err
    assert "last failure: exec failed: ^[]52" in res.out and "\x1b" not in res.out
