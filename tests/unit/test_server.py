"""The gRPC layer without a server: every RPC of a served service is answered by
Flotilla's code (never the generated base's "Method not implemented!" INTERNAL), bad bytes
become INVALID_ARGUMENT, and a log event is one line whatever a caller sends."""

from __future__ import annotations

import io
import json
import logging

import pytest

from csi._proto import csi_pb2, csi_pb2_grpc
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.kube.controller import DistributedControllerService
from csi.node import NodeService
from csi.server import JsonFormatter, TextFormatter, Undecodable, logfmt_value, safe_deserializer


@pytest.mark.parametrize(("servicer", "service"), [
    (IdentityService, "Identity"), (ControllerService, "Controller"),
    (DistributedControllerService, "Controller"), (NodeService, "Node")])
def test_every_rpc_of_a_served_service_is_flotillas(servicer: type, service: str) -> None:
    base = getattr(csi_pb2_grpc, f"{service}Servicer")
    missing = [m.name for m in csi_pb2.DESCRIPTOR.services_by_name[service].methods
               if getattr(servicer, m.name) is getattr(base, m.name)]
    assert not missing, f"{servicer.__name__} leaves {missing} to the generated base"


def test_bad_bytes_become_undecodable_not_an_exception() -> None:
    parse = safe_deserializer(csi_pb2.NodeStageVolumeRequest.FromString)
    good = csi_pb2.NodeStageVolumeRequest(volume_id="v").SerializeToString()
    assert parse(good).volume_id == "v"
    for bad in (b"\x0a\x02\xff\xfe", b"\x08\xff\xff\xff", b"\x0a\x7fA"):
        result = parse(bad)
        assert isinstance(result, Undecodable)
        assert result.reason == "DecodeError"


def test_logfmt_values_cannot_forge_fields() -> None:
    assert logfmt_value("p:vol-1") == "p:vol-1"
    assert logfmt_value("a b=c") == '"a b=c"'
    assert logfmt_value("x\nFAKE") == '"x\\nFAKE"'
    assert logfmt_value("") == '""'


@pytest.mark.parametrize("formatter", [TextFormatter("%(levelname)s %(message)s"),
                                       JsonFormatter()])
def test_one_event_is_one_line(formatter: logging.Formatter) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("flotilla-test-one-line")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("name %s", "a\nINFO forged\r\u2028\x85\x1b[31m")
        try:
            raise ValueError("boom\nline two")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert not lines[1].startswith("INFO forged")
    assert "\x1b" not in out.getvalue()
    if isinstance(formatter, JsonFormatter):
        assert json.loads(lines[0])["msg"].startswith("name a\nINFO forged")
        assert "boom" in json.loads(lines[1])["exc"]
    else:
        assert lines[0] == "WARNING name a\\nINFO forged\\r\\u2028\\x85\\x1b[31m"
        assert "ValueError: boom\\nline two" in lines[1]
