"""The VM tier: tests that boot a Debian kernel under qemu (see ``guest.py``)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import require_root
from tests.vm.guest import VMUnavailable, prepare


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a qemu guest (tests/vm)")


@pytest.fixture(autouse=True)
def _vm_ready() -> None:
    """Root, not already inside a guest, and the assets scripts/vm-setup.sh makes."""
    require_root()
    if os.environ.get("FLOTILLA_IN_GUEST"):
        pytest.skip("already inside a flotilla guest: the VM tier runs on the host")
    try:
        prepare()
    except VMUnavailable as err:
        # CI runs scripts/vm-setup.sh (through scripts/setup.sh --test): missing assets
        # are a broken set-up, not a reason to skip
        pytest.fail(str(err))
