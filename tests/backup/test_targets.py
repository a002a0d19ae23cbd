"""Target configuration: what is refused at start-up, where credentials come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.backup.targets import DirTarget, S3Target, build_target, build_targets
from csi.config import parse_config
from csi.errors import InvalidArgument

POOLS = "pools: [{name: p, type: filepool, path: /x}]\n"


@pytest.mark.parametrize(("targets", "message"), [
    ("[{name: a, type: ftp}]", "type 'ftp' is not one of s3, dir"),
    ("[{name: a, type: dir}]", "option 'path' is required"),
    ("[{name: a, type: dir, path: rel}]", "must be absolute"),
    ("[{name: a, type: dir, path: /b, colour: red}]", "unknown option(s) colour"),
    ("[{name: a, type: s3}]", "option 'bucket' is required"),
    ("[{name: a, type: s3, bucket: b, addressing_style: odd}]", "path or virtual"),
    ("[{name: A!, type: dir, path: /b}]", "must be 1-63 characters"),
    ("[{name: a, type: dir, path: /b}, {name: a, type: dir, path: /c}]", "used twice"),
    ("{name: a}", "must be a list"),
])
def test_bad_targets_are_start_up_errors(targets: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(POOLS + f"backup_targets: {targets}\n")


def test_targets_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(POOLS + "backup_targets: [{name: nas, type: dir, path: /mnt/b}]\n")
    targets = build_targets(config.backup_targets)
    assert isinstance(targets["nas"], DirTarget) and targets["nas"].describe() == "dir:/mnt/b"
    assert parse_config(POOLS).backup_targets == []

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-env")
    t = build_target({"name": "s3", "type": "s3", "bucket": "b", "endpoint": "http://h:1",
                      "prefix": "/x/"})
    assert isinstance(t, S3Target)
    assert t._args["aws_access_key_id"] == "from-env" and t.prefix == "x/"
    assert "secret" not in t.describe() and t.describe() == "s3:http://h:1/b/x/"

    (tmp_path / "id").write_text("from-file\n")
    (tmp_path / "key").write_text("secret-file\n")
    monkeypatch.setenv("MY_KEY", "other")
    t = build_target({"name": "s3", "type": "s3", "bucket": "b",
                      "access_key_id_file": str(tmp_path / "id"),
                      "secret_access_key_file": str(tmp_path / "key"),
                      "insecure_skip_verify": True})
    assert isinstance(t, S3Target)
    assert t._args["aws_access_key_id"] == "from-file"
    assert t._args["aws_secret_access_key"] == "secret-file"
    assert t._args["verify"] is False
    t = build_target({"name": "s3", "type": "s3", "bucket": "b",
                      "access_key_id_env": "MY_KEY", "ca_bundle": "/ca.pem"})
    assert isinstance(t, S3Target)
    assert t._args["aws_access_key_id"] == "other" and t._args["verify"] == "/ca.pem"
    with pytest.raises(InvalidArgument, match="cannot read access_key_id_file"):
        build_target({"name": "s3", "type": "s3", "bucket": "b",
                      "access_key_id_file": str(tmp_path / "none")})
