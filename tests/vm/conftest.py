"""The VM tier: tests that boot a Debian kernel under qemu (see ``guest.py``).

Guest runs are slow (a TCG guest is ~5-10x slower than the host), so a test does not boot
its guest itself: it is marked ``@pytest.mark.guest_job("name")`` and its module defines
``GUEST_JOBS = {"name": GuestJob(...)}`` (or a function returning one, called only
when the test is selected). When the first such test starts, every job of
the selected tests is submitted to one :class:`~tests.vm.guest.GuestScheduler`
(``FLOTILLA_VM_PARALLEL`` guests at once, longest first); each test then waits for its
own result through the ``guest_result`` fixture. Guests never run while the other tiers
do, and the session kills any guest still running when it ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.vm.guest import GuestJob, GuestResult, GuestScheduler, VMUnavailable, prepare


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a qemu guest (tests/vm)")
    config.addinivalue_line("markers", "guest_job(name): the test checks the guest run "
                            "GUEST_JOBS[name] of its module (see tests/vm/conftest.py)")


def _check_vm_ready() -> None:
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


@pytest.fixture(autouse=True)
def _vm_ready() -> None:
    _check_vm_ready()


def job_key(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("guest_job")
    if marker is None:
        return None
    module = getattr(item, "module", None)
    return f"{module.__name__.rpartition('.')[2] if module else 'vm'}.{marker.args[0]}"


@pytest.fixture(scope="session")
def guest_scheduler(request: pytest.FixtureRequest) -> Iterator[GuestScheduler]:
    _check_vm_ready()
    base_dir = Path("/var/tmp/flotilla-tests")
    base_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="vm-", dir=base_dir))
    scheduler = GuestScheduler(base)
    jobs: dict[str, GuestJob] = {}
    for item in request.session.items:
        key = job_key(item)
        if key is not None:
            job = item.module.GUEST_JOBS[key.partition(".")[2]]
            jobs[key] = job() if callable(job) else job
    scheduler.submit_all(jobs)
    try:
        yield scheduler
    finally:
        scheduler.shutdown()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def guest_result(request: pytest.FixtureRequest,
                 guest_scheduler: GuestScheduler) -> GuestResult:
    """The finished guest run of this test's ``guest_job`` marker."""
    key = job_key(request.node)
    assert key is not None, "guest_result needs @pytest.mark.guest_job(name)"
    future = guest_scheduler.futures[key]
    return future.result()
