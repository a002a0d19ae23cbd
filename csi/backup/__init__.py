"""Incremental, deduplicated backups of snapshots to S3 or a directory (docs/backups.md)."""
