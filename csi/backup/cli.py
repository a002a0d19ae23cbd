"""``flotillactl backup``: work on a backup target directly (no driver needed).

    flotillactl backup [--config FILE] [--target NAME] list [--volume ID]
    flotillactl backup ... inspect BACKUP_ID
    flotillactl backup ... verify (BACKUP_ID... | --all)
    flotillactl backup ... restore BACKUP_ID --to PATH   (a new file, or a block device)
    flotillactl backup ... prune [--keep-last N] [--keep-within 7d] [--dry-run]
    flotillactl backup ... gc

Targets come from the ``backup_targets`` of the driver's configuration file (credentials
from the same environment variables or Secret files the driver uses).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

from csi.backup import engine
from csi.backup.targets import Target, build_targets
from csi.config import load_config
from csi.errors import FlotillaError, InvalidArgument

DEFAULT_CONFIG = "/etc/flotilla/pools.yaml"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 36h or 7d")
    return float(m[1]) * UNITS[m[2]]


class ProgressBar:
    """A one-line progress bar on stderr (a plain final line when not a terminal)."""

    def __init__(self, total: int, title: str, out: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.title = title
        self.out = out or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._last = 0.0
        self.tty = self.out.isatty()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.tty and (now - self._last > 0.1 or self.done >= self.total):
                self._last = now
                self._draw()

    def _draw(self, end: str = "") -> None:
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / max(time.monotonic() - self.start, 1e-3)
        self.out.write(f"\r{self.title} [{bar}] {frac * 100:5.1f}% {human(self.done)}/"
                       f"{human(self.total)} {human(rate)}/s{end}")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self._draw("\n")
        else:
            self.out.write(f"{self.title}: {human(self.done)} in "
                           f"{time.monotonic() - self.start:.1f}s\n")


def _targets(args: argparse.Namespace) -> list[Target]:
    config = load_config(args.config)
    targets = build_targets(config.backup_targets)
    if not targets:
        raise InvalidArgument(f"{args.config} has no backup_targets")
    if args.target:
        if args.target not in targets:
            raise InvalidArgument(f"no backup target {args.target!r} in {args.config} "
                                  f"(configured: {', '.join(targets)})")
        return [targets[args.target]]
    return list(targets.values())


def _one_target(args: argparse.Namespace) -> Target:
    targets = _targets(args)
    if len(targets) > 1:
        raise InvalidArgument("several backup targets are configured; name one with "
                              "--target")
    return targets[0]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    print(f"{'BACKUP ID':<48} {'TARGET':<10} {'SOURCE VOLUME':<48} {'SIZE':>9} "
          f"{'DATA':>9} {'STORED':>9}  CREATED")
    for target in _targets(args):
        for m in engine.list_manifests(target):
            if args.volume and m.source_volume_id != args.volume:
                continue
            print(f"{m.id:<48} {target.name:<10} {m.source_volume_id:<48} "
                  f"{human(m.size):>9} {human(m.data_bytes):>9} {human(m.stored_bytes):>9}"
                  f"  {_when(m.created)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    target = _one_target(args)
    m = engine.read_manifest(target, args.backup_id)
    body = m.to_json()
    body["chunks"] = len(m.chunks)
    body.update(target=target.name, where=target.describe(), data_bytes=m.data_bytes,
                stored_bytes=m.stored_bytes, created_utc=_when(m.created))
    print(json.dumps(body, indent=2, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = _one_target(args)
    manifests = engine.list_manifests(target) if args.all else \
        [engine.read_manifest(target, b) for b in args.backup_ids]
    if not manifests:
        raise InvalidArgument("name backup ids to verify, or --all")
    bad = 0
    for m in manifests:
        bar = ProgressBar(m.data_bytes, f"verify {m.id}")
        problems = engine.verify(target, m, progress=bar)
        bar.finish()
        for p in problems:
            print(f"BAD  {p}")
        bad += bool(problems)
        if not problems:
            print(f"OK   {m.id}: {len(m.chunks)} chunks, {human(m.data_bytes)}")
    return 1 if bad else 0


def cmd_restore(args: argparse.Namespace) -> int:
    target = _one_target(args)
    m = engine.read_manifest(target, args.backup_id)
    dest = args.to
    bar = ProgressBar(m.size, f"restore {m.id}")
    if os.path.exists(dest) and stat.S_ISBLK(os.stat(dest).st_mode):
        fd = os.open(dest, os.O_WRONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < m.size:
                raise InvalidArgument(f"{dest} has {size} bytes; the backup needs {m.size}")
            # a device cannot be swapped in atomically: check every chunk first
            problems = engine.verify(target, m)
            if problems:
                raise engine.CorruptBackup("; ".join(problems[:5]))
            downloaded = engine.restore_to_fd(target, m, fd, fresh=False, progress=bar)
        finally:
            os.close(fd)
    else:
        downloaded = engine.restore_to_file(target, m, dest, progress=bar)
    bar.finish()
    print(f"restored {m.id} ({human(m.size)}) to {dest}; {human(downloaded)} downloaded")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    target = _one_target(args)
    doomed = engine.select_prune(engine.list_manifests(target), args.keep_last,
                                 args.keep_within)
    for m in doomed:
        print(f"{'would delete' if args.dry_run else 'delete'} {m.id} "
              f"({m.source_volume_id}, {_when(m.created)})")
        if not args.dry_run:
            engine.delete_backup(target, m.id)
    if not args.dry_run:
        return cmd_gc(args)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    target = _one_target(args)
    result = engine.collect_garbage(target, f"flotillactl@{os.uname().nodename}")
    if result.deferred:
        print("garbage collection deferred: a backup is running (retry later)")
        return 1
    print(f"deleted {result.deleted_chunks} unreferenced chunks "
          f"({human(result.deleted_bytes)}), kept {result.kept_chunks}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="list, inspect, verify, restore and prune backups")
    p.add_argument("--config", default=os.environ.get("FLOTILLA_CONFIG", DEFAULT_CONFIG),
                   help="driver configuration with backup_targets (default: %(default)s)")
    p.add_argument("--target", default="", help="backup target name (default: the only one)")
    bsub = p.add_subparsers(dest="backup_command", required=True)
    ls = bsub.add_parser("list", help="backups in the target(s)")
    ls.add_argument("--volume", default="", help="only backups of this source volume id")
    ins = bsub.add_parser("inspect", help="a backup's manifest (without the chunk list)")
    ins.add_argument("backup_id")
    ver = bsub.add_parser("verify", help="download every chunk and check its hash")
    ver.add_argument("backup_ids", nargs="*")
    ver.add_argument("--all", action="store_true")
    res = bsub.add_parser("restore", help="restore into a new sparse file or a block device")
    res.add_argument("backup_id")
    res.add_argument("--to", required=True, help="a new file, or an existing block device")
    pr = bsub.add_parser("prune", help="delete old backups per volume, then collect chunks")
    pr.add_argument("--keep-last", type=int, default=None)
    pr.add_argument("--keep-within", type=parse_duration, default=None,
                    help="keep backups younger than this (e.g. 36h, 7d)")
    pr.add_argument("--dry-run", action="store_true")
    bsub.add_parser("gc", help="delete chunks no backup references")


COMMANDS = {"list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify,
            "restore": cmd_restore, "prune": cmd_prune, "gc": cmd_gc}


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.backup_command](args)
    except FlotillaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
