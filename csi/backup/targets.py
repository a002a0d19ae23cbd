"""Where backups go: a directory (local disk, an NFS mount) or an S3-compatible bucket.

A target is a flat key/value store of immutable objects. Keys are ``/``-separated paths
relative to the target's root (``chunks/ab/<sha256>``, ``manifests/<id>.json``,
``locks/<uuid>.json``). Writes are atomic: a reader sees a whole object or none.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from csi.errors import InvalidArgument, Unavailable

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TARGET_TYPES = ("s3", "dir")


class MissingObject(Unavailable):
    """The key does not exist in the target."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class Target(abc.ABC):
    """A backup target (see the module docstring). Methods raise Unavailable when the
    target cannot be reached, MissingObject from :meth:`get` of an absent key."""

    type = ""

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent is fine."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder such as ``chunks/``)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the target is, for messages (no credentials)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class TargetOptions:
    """Typed reading of one ``backup_targets`` entry; :meth:`finish` rejects unknown keys."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.name = str(raw.get("name"))
        self.used = {"name", "type"}

    def _bad(self, key: str, value: object, want: str) -> InvalidArgument:
        return InvalidArgument(f"backup target {self.name!r}: option {key}={value!r} must "
                               f"be {want}")

    def text(self, key: str, default: str | None = None, required: bool = False) -> str:
        self.used.add(key)
        value = self.raw.get(key)
        if value is None:
            if required:
                raise InvalidArgument(f"backup target {self.name!r}: option {key!r} is "
                                      "required")
            return default or ""
        if not isinstance(value, str) or not value:
            raise self._bad(key, value, "a non-empty string")
        return value

    def flag(self, key: str, default: bool) -> bool:
        self.used.add(key)
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise InvalidArgument(f"backup target {self.name!r}: unknown option(s) "
                                  f"{', '.join(unknown)}; see docs/backups.md")


# ---- directory ------------------------------------------------------------------------

class DirTarget(Target):
    """Objects as files under ``path`` (written to a temp file, fsynced, renamed)."""

    type = "dir"

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        if not os.path.isabs(path):
            raise InvalidArgument(f"backup target {name!r}: path {path!r} must be absolute")
        self.path = os.path.normpath(path)

    def _file(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise InvalidArgument(f"bad object key {key!r}")
        return os.path.join(self.path, key)

    def put(self, key: str, data: bytes) -> None:
        final = self._file(key)
        folder = os.path.dirname(final)
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            raise Unavailable(f"backup target {self.name!r}: cannot write {final}: "
                              f"{err.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise MissingObject(f"backup target {self.name!r}: {key} does not exist") from None
        except OSError as err:
            raise Unavailable(f"backup target {self.name!r}: cannot read {key}: "
                              f"{err.strerror}") from None

    def exists(self, key: str) -> bool:
        return os.path.exists(self._file(key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._file(prefix.rstrip("/")) if prefix else self.path
        for root, _dirs, files in os.walk(base):
            for fname in sorted(files):
                if ".tmp-" in fname:
                    continue
                full = os.path.join(root, fname)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(os.path.relpath(full, self.path), st.st_size, st.st_mtime)

    def describe(self) -> str:
        return f"dir:{self.path}"


# ---- S3 -------------------------------------------------------------------------------

class S3Target(Target):
    """An S3-compatible bucket through boto3 (path-style addressing by default)."""

    type = "s3"

    def __init__(self, name: str, bucket: str, prefix: str = "", endpoint: str = "",
                 region: str = "us-east-1", access_key_id: str = "",
                 secret_access_key: str = "", verify: bool | str = True,
                 addressing_style: str = "path") -> None:
        super().__init__(name)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self._args: dict[str, Any] = {
            "region_name": region, "endpoint_url": endpoint or None, "verify": verify,
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
        }
        self._addressing = addressing_style
        self._local = threading.local()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            client = session.client("s3", config=Config(
                s3={"addressing_style": self._addressing},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10, read_timeout=60,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ), **self._args)
            self._local.client = client
        return client

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, what: str, key: str, err: Exception) -> Unavailable:
        return Unavailable(f"backup target {self.name!r} ({self.describe()}): {what} {key}: "
                           f"{err}")

    @staticmethod
    def _code(err: Exception) -> str:
        response = getattr(err, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as err:
            raise self._fail("cannot write", key, err) from None

    def get(self, key: str) -> bytes:
        try:
            resp = self._client().get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = resp["Body"].read()
            return body
        except Exception as err:
            if self._code(err) in ("NoSuchKey", "404", "NotFound"):
                raise MissingObject(f"backup target {self.name!r}: {key} does not "
                                    "exist") from None
            raise self._fail("cannot read", key, err) from None

    def exists(self, key: str) -> bool:
        try:
            self._client().head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            if self._code(err) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail("cannot look up", key, err) from None
        return True

    def delete(self, key: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            if self._code(err) in ("NoSuchKey", "404", "NotFound"):
                return
            raise self._fail("cannot delete", key, err) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"]),
                                     item["LastModified"].timestamp())
        except Unavailable:
            raise
        except Exception as err:
            raise self._fail("cannot list", prefix, err) from None

    def describe(self) -> str:
        where = self.endpoint or "aws"
        return f"s3:{where}/{self.bucket}/{self.prefix}"

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None


def _secret(opts: TargetOptions, key: str, env_default: str) -> str:
    """A credential: ``<key>_file`` (a mounted Secret), else the env variable that
    ``<key>_env`` names (default ``env_default``); never a literal in the config."""
    path = opts.text(f"{key}_file")
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as err:
            raise InvalidArgument(f"backup target {opts.name!r}: cannot read {key}_file "
                                  f"{path}: {err.strerror}") from None
    return os.environ.get(opts.text(f"{key}_env", env_default), "")


def build_target(spec: dict[str, Any]) -> Target:
    """A Target from one ``backup_targets`` entry (options checked, nothing contacted)."""
    opts = TargetOptions(spec)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(f"backup target name {name!r} must be 1-63 characters of "
                              "a-z, 0-9 and '-'")
    kind = spec.get("type")
    target: Target
    if kind == "dir":
        target = DirTarget(name, opts.text("path", required=True))
    elif kind == "s3":
        ca = opts.text("ca_bundle")
        insecure = opts.flag("insecure_skip_verify", False)
        style = opts.text("addressing_style", "path")
        if style not in ("path", "virtual"):
            raise opts._bad("addressing_style", style, "path or virtual")
        target = S3Target(
            name, bucket=opts.text("bucket", required=True), prefix=opts.text("prefix"),
            endpoint=opts.text("endpoint"), region=opts.text("region", "us-east-1"),
            access_key_id=_secret(opts, "access_key_id", "AWS_ACCESS_KEY_ID"),
            secret_access_key=_secret(opts, "secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            verify=False if insecure else (ca or True), addressing_style=style)
    else:
        raise InvalidArgument(f"backup target {name!r}: type {kind!r} is not one of "
                              f"{', '.join(TARGET_TYPES)}")
    opts.finish()
    return target


def build_targets(specs: list[dict[str, Any]]) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for spec in specs:
        target = build_target(spec)
        if target.name in targets:
            raise InvalidArgument(f"backup target name {target.name!r} is used twice")
        targets[target.name] = target
    return targets
