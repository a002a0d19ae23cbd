#!/usr/bin/env python3
"""Write an OCI image archive (the layout `ctr images import` reads) from layer tarballs.

    oci.py OUT.tar NAME:TAG --layer L1.tar [--layer L2.tar ...] [--entrypoint JSON]
           [--cmd JSON] [--env K=V ...] [--workdir DIR] [--user UID]

No registry is reachable here, so images are assembled from local files: each layer is an
uncompressed tar (its digest is its diff id), the config names them in order, and the
index carries the image name in `io.containerd.image.name` (what containerd's importer
uses) and the tag in `org.opencontainers.image.ref.name`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import time


def digest_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("name", help="full image name with tag, e.g. flotilla.local/pause:3.10")
    p.add_argument("--layer", action="append", required=True)
    p.add_argument("--entrypoint", type=json.loads, default=None)
    p.add_argument("--cmd", type=json.loads, default=None)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--workdir", default="")
    p.add_argument("--user", default="")
    args = p.parse_args()

    layers = [(path, *digest_file(path)) for path in args.layer]
    config: dict[str, object] = {"Env": args.env or ["PATH=/usr/local/sbin:/usr/local/bin:"
                                                     "/usr/sbin:/usr/bin:/sbin:/bin"]}
    if args.entrypoint is not None:
        config["Entrypoint"] = args.entrypoint
    if args.cmd is not None:
        config["Cmd"] = args.cmd
    if args.workdir:
        config["WorkingDir"] = args.workdir
    if args.user:
        config["User"] = args.user
    image_config = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [d for _, d, _ in layers]},
        "history": [{"created_by": f"flotilla scripts/cluster/oci.py {os.path.basename(p)}"}
                    for p, _, _ in layers],
    }
    cfg_digest, cfg_bytes = blob(json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": len(cfg_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": d, "size": size} for _, d, size in layers],
    }
    man_digest, man_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest, "size": len(man_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.name,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }

    tmp = args.out + ".part"
    with tarfile.open(tmp, "w") as out:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            out.addfile(info, io.BytesIO(data))

        add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_bytes("index.json", json.dumps(index).encode())
        add_bytes(f"blobs/sha256/{cfg_digest[7:]}", cfg_bytes)
        add_bytes(f"blobs/sha256/{man_digest[7:]}", man_bytes)
        for path, d, _ in layers:
            out.add(path, arcname=f"blobs/sha256/{d[7:]}", recursive=False)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
