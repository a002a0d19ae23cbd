#!/usr/bin/env bash
# The S3-compatible server the backup tests run on 127.0.0.1 (tests/backup): gofakes3
# (MIT), built once with `go install` and cached. Idempotent; prints the binary's path.
#   scripts/s3-test-server.sh
# Why not MinIO (AGPL) or SeaweedFS (only a pseudo-version, with replace directives, and
# a build far too long for CI's budget): see docs/backups.md, "How this is tested".
set -euo pipefail
GOFAKES3_VERSION=v1.2.0
CACHE=${FLOTILLA_S3_CACHE:-/var/cache/flotilla/s3}
BIN=$CACHE/gofakes3-$GOFAKES3_VERSION
if [[ ! -x $BIN ]]; then
    printf '[setup] building gofakes3 %s (S3 test server, ~2 min cold)\n' "$GOFAKES3_VERSION" >&2
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    GOBIN=$tmp go install "github.com/johannesboyne/gofakes3/cmd/gofakes3@${GOFAKES3_VERSION}"
    mv "$tmp/gofakes3" "$BIN"
fi
echo "$BIN"
