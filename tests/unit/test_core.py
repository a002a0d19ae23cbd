from __future__ import annotations

import threading
import time

import grpc
import pytest

from csi.config import load_config, parse_config
from csi.controller import paginate, split_parameters
from csi.errors import (
    Aborted,
    CommandFailed,
    FlotillaError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    status_code,
)
from csi.locks import KeyedTryLock
from csi.pools.base import Options, new_id, parse_id
from csi.system import parse_mountinfo
from csi.validation import parse_size


def test_one_table_maps_errors_to_codes() -> None:
    assert status_code(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(ResourceExhausted("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(Aborted("x")) == grpc.StatusCode.ABORTED
    assert status_code(CommandFailed(["mount"], 32, "boom")) == grpc.StatusCode.INTERNAL
    assert status_code(FlotillaError("x")) == grpc.StatusCode.INTERNAL


def test_try_lock_refuses_instead_of_queueing() -> None:
    locks = KeyedTryLock()
    with locks.hold("a", "b"):
        with pytest.raises(Aborted, match="'b'"), locks.hold("b", "c"):
            pass
        assert not locks.busy("c")  # nothing taken by the refused call
        with locks.hold("c"):
            assert locks.busy("c")
    assert not locks.busy("a")


def test_try_lock_one_winner_among_threads() -> None:
    locks = KeyedTryLock()
    barrier = threading.Barrier(16)
    results: list[str] = []
    release = threading.Event()

    def worker() -> None:
        barrier.wait()
        try:
            with locks.hold("name"):
                results.append("won")
                release.wait(5)
        except Aborted:
            results.append("aborted")

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while results.count("aborted") < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert results.count("won") == 1 and results.count("aborted") == 15


def test_ids() -> None:
    vid = new_id("pool-1", "vol")
    assert parse_id(vid) == ("pool-1", "vol", vid.split("-", 2)[-1])
    assert len(vid.encode()) <= 128
    for bad in ["", "pool", "pool:vol-xyz", "Pool:vol-" + "0" * 32, "p:vol-" + "0" * 31]:
        assert parse_id(bad) is None


def test_pagination_tokens_survive_deletion() -> None:
    ids = sorted(new_id("p", "vol") for _ in range(5))
    page, token = paginate(ids, lambda i: i, 2, "")
    assert page == ids[:2] and token == ids[1]
    rest = [i for i in ids if i != ids[1]]  # the last entry of the page is deleted
    page2, token2 = paginate(rest, lambda i: i, 2, token)
    assert page2 == ids[2:4] and token2 == ids[3]
    page3, token3 = paginate(rest, lambda i: i, 0, token2)
    assert page3 == ids[4:] and token3 == ""
    with pytest.raises(Aborted):
        paginate(ids, lambda i: i, 2, "invalid-token")
    with pytest.raises(InvalidArgument):
        paginate(ids, lambda i: i, -1, "")


def test_parameters() -> None:
    kept = split_parameters({"pool": "a", "fsType": "xfs",
                             "csi.storage.k8s.io/pvc/name": "data"}, ("pool", "fsType"))
    assert kept == {"pool": "a", "fsType": "xfs"}
    with pytest.raises(InvalidArgument, match="unknown parameter 'colour'"):
        split_parameters({"colour": "blue"}, ("pool",))


def test_config() -> None:
    cfg = load_config(None, "/srv/state")
    assert cfg.pools[0]["path"] == "/srv/state/pools/default"
    assert cfg.default_pool == "default"
    assert cfg.allowed_roots == ["/var/lib/kubelet"]
    for bad in ["[]", "pools: []", "pools: [{name: a, type: filepool}, {name: a}]",
                "pools: [{name: a}]\nsurprise: 1", "pools: [{name: a}]\nallowed_roots: [rel]",
                "pools: [{name: a}]\nmax_volumes_per_node: -1", "{{"]:
        with pytest.raises(InvalidArgument):
            parse_config(bad)


def test_options() -> None:
    opts = Options("p", {"name": "p", "type": "t", "path": "/x", "ratio": 2.5, "size": "1Gi"})
    assert opts.text("path") == "/x"
    assert opts.number("ratio", 1.0, 0.1, 10.0) == 2.5
    assert opts.size("size", None) == 1 << 30
    assert opts.flag("discard", True) is True
    opts.finish()
    with pytest.raises(InvalidArgument, match="unknown option"):
        Options("p", {"bogus": 1}).finish()
    with pytest.raises(InvalidArgument, match=r"from 0\.1 to 10"):
        Options("p", {"ratio": 11}).number("ratio", 1.0, 0.1, 10.0)
    with pytest.raises(InvalidArgument, match="required"):
        Options("p", {}).text("path")


def test_parse_size() -> None:
    assert parse_size("20Gi") == 20 << 30
    assert parse_size("1.5Mi") == 3 << 19
    assert parse_size("1G") == 10**9
    assert parse_size(4096) == 4096
    for bad in ["x", "-1Gi", "Gi"]:
        with pytest.raises(InvalidArgument):
            parse_size(bad)


def test_parse_mountinfo_unescapes() -> None:
    text = ("36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root "
            "rw,errors=continue\n"
            "37 35 0:5 /loop3 /target ro,relatime shared:2 - devtmpfs udev rw\n")
    a, b = parse_mountinfo(text)
    assert a.mount_point == "/mnt/with space" and a.fstype == "ext3" and not a.readonly
    assert b.readonly and b.root == "/loop3" and b.fstype == "devtmpfs"
