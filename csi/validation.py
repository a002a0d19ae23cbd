"""Request validation shared by the servicers. Every failure is a typed error with a
message that says what was wrong and what is accepted."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from csi._proto import csi_pb2
from csi.errors import InvalidArgument, OutOfRange

MAX_NAME_BYTES = 128  # the spec's size limit for names, ids and keys
MAX_PATH_BYTES = 4096
#: NAME_MAX of Linux filesystems: a longer component can name nothing
MAX_COMPONENT_BYTES = 255
#: the largest volume anyone may ask for (1 PiB); above it a size is treated as a mistake
MAX_VOLUME_BYTES = 1 << 50
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"
#: the smallest filesystem mkfs accepts (xfsprogs >= 5.19 refuses below 300 MiB)
MIN_FS_BYTES = {"xfs": 300 << 20, "ext4": 1 << 20}
#: keys the external-provisioner / snapshotter add; accepted and ignored
K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"

AccessMode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset({
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
})
MULTI_NODE_MODES = frozenset({
    AccessMode.MULTI_NODE_READER_ONLY,
    AccessMode.MULTI_NODE_SINGLE_WRITER,
    AccessMode.MULTI_NODE_MULTI_WRITER,
})
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})


def _printable(value: str, what: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"{what} contains a control character (NUL, newline, ...)")


def check_name(name: str, what: str = "name") -> None:
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is {len(name.encode())} bytes; the limit is "
                              f"{MAX_NAME_BYTES}")
    _printable(name, what)


def check_id(object_id: str, what: str = "volume_id") -> None:
    """Ids must never be able to name a path: no '/', no '..', no NUL."""
    check_name(object_id, what)
    if "/" in object_id or ".." in object_id:
        raise InvalidArgument(f"{what} {object_id!r} must not contain '/' or '..'")


def check_path(path: str, roots: Sequence[str], what: str) -> str:
    """An absolute path, without '..', control characters or over-long components, that
    names a place inside one of the allowed roots (lexically: ``roots`` lists each root as
    configured and as its real path)."""
    if not path:
        raise InvalidArgument(f"{what} is required")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    _printable(path, what)
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r} must not contain '..'")
    long = [c for c in path.split("/") if len(c.encode()) > MAX_COMPONENT_BYTES]
    if long:
        raise InvalidArgument(f"{what} has a component of {len(long[0].encode())} bytes; "
                              f"the limit is {MAX_COMPONENT_BYTES}")
    norm = os.path.normpath(path)
    # lexical only: links are refused where the path is resolved (System.node_path)
    for root in roots:
        base = os.path.normpath(root).rstrip("/")
        if norm == base or norm.startswith(base + "/"):
            return norm
    raise InvalidArgument(
        f"{what} {path!r} is outside the allowed roots ({', '.join(roots)}); "
        "add its root to allowed_roots in the pool config"
    )


def inside_roots(path: str, roots: Sequence[str]) -> bool:
    try:
        check_path(path, roots, "path")
    except InvalidArgument:
        return False
    return True


@dataclass(frozen=True)
class CapabilitySet:
    block: bool
    mount: bool
    fs_type: str
    mount_flags: tuple[str, ...]
    modes: frozenset[int]

    @property
    def read_only(self) -> bool:
        return bool(self.modes) and self.modes <= READ_ONLY_MODES

    @property
    def multi_node(self) -> bool:
        return bool(self.modes & MULTI_NODE_MODES)


def read_capabilities(
    caps: Iterable[csi_pb2.VolumeCapability], what: str = "volume_capabilities"
) -> CapabilitySet:
    """Validate and summarise capabilities; raise InvalidArgument for malformed ones."""
    caps = list(caps)
    if not caps:
        raise InvalidArgument(f"{what} is required")
    block = mount = False
    fs_types: set[str] = set()
    flags: list[str] = []
    modes: set[int] = set()
    for cap in caps:
        kind = cap.WhichOneof("access_type")
        if kind is None:
            raise InvalidArgument(f"{what}: each capability needs access_type block or mount")
        if not cap.HasField("access_mode") or cap.access_mode.mode == AccessMode.UNKNOWN:
            raise InvalidArgument(f"{what}: each capability needs an access_mode")
        modes.add(cap.access_mode.mode)
        if kind == "block":
            block = True
        else:
            mount = True
            if cap.mount.fs_type:
                fs_types.add(cap.mount.fs_type)
            for flag in cap.mount.mount_flags:
                check_mount_flag(flag)
                flags.append(flag)
    if block and mount:
        raise InvalidArgument(f"{what}: a volume is either block or mount, not both")
    if len(fs_types) > 1:
        raise InvalidArgument(f"{what}: conflicting fs_type values {sorted(fs_types)}")
    fs_type = fs_types.pop() if fs_types else ""
    if fs_type and fs_type not in FS_TYPES:
        raise InvalidArgument(f"fs_type {fs_type!r} is not supported; use one of "
                              f"{', '.join(FS_TYPES)}")
    return CapabilitySet(block, mount, fs_type, tuple(flags), frozenset(modes))


#: options mount(8) itself acts on: they would change what is mounted where (a bind, a
#: move, a loop device, propagation, owner or mode changes of the target), not how
REFUSED_MOUNT_OPTIONS = frozenset({
    "bind", "rbind", "move", "remount", "loop", "offset", "sizelimit", "encryption",
    "helper", "uhelper", "user", "users", "owner", "group",
    "shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable",
    "runbindable",
})
REFUSED_MOUNT_PREFIXES = ("make-", "x-mount.", "x-", "comment=")


def check_mount_flag(flag: str) -> None:
    _printable(flag, "mount flag")
    if not flag.strip(", "):
        raise InvalidArgument(f"mount flag {flag!r} is empty")
    if len(flag) > 256:
        raise InvalidArgument("mount flag is longer than 256 characters")
    for option in flag.split(","):
        key = option.strip().split("=", 1)[0].lower()
        if key in REFUSED_MOUNT_OPTIONS or option.strip().lower().startswith(
                REFUSED_MOUNT_PREFIXES):
            raise InvalidArgument(f"mount flag {option.strip()!r} is not allowed: it changes "
                                  "what the driver mounts where; use filesystem options "
                                  "such as noatime or discard")


def resolve_size(
    required: int, limit: int, default: int, minimum: int, granularity: int,
    minimum_is: str = "the smallest volume of this filesystem",
) -> int:
    """Pick a volume size for a capacity range (0 = unspecified, as the spec says);
    ``minimum_is`` says what sets ``minimum``, for the refusal of a limit below it."""
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if required > MAX_VOLUME_BYTES or limit > MAX_VOLUME_BYTES:
        raise OutOfRange(f"capacity_range asks for more than {MAX_VOLUME_BYTES} bytes "
                         "(1 PiB), the largest volume Flotilla provisions")
    if limit and required > limit:
        raise OutOfRange(f"capacity_range required_bytes {required} is above "
                         f"limit_bytes {limit}")
    if limit and limit < minimum:
        raise OutOfRange(f"limit_bytes {limit} is below {minimum} bytes, {minimum_is}")
    size = required or (min(default, limit) if limit else default)
    size = max(size, minimum)
    size = -(-size // granularity) * granularity
    if limit and size > limit:
        size = limit // granularity * granularity
        if size < max(required, minimum):
            size = limit  # an unaligned size still works; keep within the range
    return size


def parse_size(value: str | int) -> int:
    """Parse ``10Gi``, ``512Mi``, ``1G``, ``4096`` into bytes."""
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"size {value} is negative")
        return value
    text = str(value).strip()
    units = {
        "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
        "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            mult = units[suffix]
            break
    else:
        number, mult = text, 1
    try:
        amount = float(number)
    except ValueError:
        raise InvalidArgument(
            f"cannot read size {value!r}: use bytes or a suffix Ki, Mi, Gi, Ti"
        ) from None
    if amount < 0:
        raise InvalidArgument(f"size {value!r} is negative")
    return int(amount * mult)
