"""Fixtures of the backup tests: an S3-compatible server on 127.0.0.1 (gofakes3, built by
scripts/s3-test-server.sh) and backup targets of both types."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from csi.backup.targets import DirTarget, S3Target, Target
from tests.helpers import REPO

ACCESS_KEY, SECRET_KEY = "flotilla-test", "flotilla-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def spec(self, name: str, bucket: str, prefix: str = "backups") -> dict[str, Any]:
        """A backup_targets entry; credentials come from the driver's environment."""
        return {"name": name, "type": "s3", "endpoint": self.endpoint, "bucket": bucket,
                "prefix": prefix}

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """gofakes3 (in-memory backend) on a free port of 127.0.0.1 for the whole session."""
    found = subprocess.run([str(REPO / "scripts" / "s3-test-server.sh")], capture_output=True,
                           text=True, check=False)
    binary = found.stdout.strip()
    if found.returncode != 0 or not binary or not os.access(binary, os.X_OK):
        pytest.skip("the S3 test server (gofakes3) could not be built: no Go toolchain or "
                    f"no module proxy here ({found.stderr.strip()[-300:]})")
    port = _free_port()
    proc = subprocess.Popen([binary, "-backend", "memory", "-host", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gofakes3 did not start") from None
            time.sleep(0.1)
    yield S3Server(endpoint)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=["dir", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "dir":
        yield DirTarget("t", str(tmp_path / "target"))
        return
    server: S3Server = request.getfixturevalue("s3_server")
    t = S3Target("t", bucket=server.new_bucket(), prefix="p", endpoint=server.endpoint,
                 access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    yield t
    t.close()
