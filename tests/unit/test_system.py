from __future__ import annotations

import time

import pytest

from csi import system as system_mod
from csi.errors import CommandFailed, CommandTimeout
from csi.system import System


def test_command_failure_carries_stderr() -> None:
    with pytest.raises(CommandFailed, match="exited 3: boom"):
        System().run(["sh", "-c", "echo boom >&2; exit 3"])
    assert System().run(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_timeout_kills_the_whole_process_group() -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="no answer within"):
        System().run(["sh", "-c", "sleep 60 & sleep 60"], timeout=0.3)
    assert time.monotonic() - start < 5


def test_a_command_that_will_not_go_away_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """An escaped grandchild (its own session) keeps the pipes open after the kill: the
    call must still return, soon after its timeout."""
    monkeypatch.setattr(system_mod, "KILL_GRACE", 0.5)
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        System().run(["sh", "-c", "setsid sleep 3 & sleep 60"], timeout=0.3)
    assert time.monotonic() - start < 2.5
