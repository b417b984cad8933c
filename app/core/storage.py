"""Local file storage under DATA_DIR, keyed by generated names. Writes go to a temporary name, are fsynced,
then renamed, so a reader never sees half a file."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from functools import lru_cache
from pathlib import Path

from app.core.config import get_settings


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"

    def temp_path(self, suffix: str = ".part") -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{secrets.token_hex(16)}{suffix}"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the data directory: {key!r}")
        return path

    def commit(self, tmp_path: Path, key: str) -> Path:
        """fsync `tmp_path` and move it to `key` atomically."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
        return target

    def store_file(self, source: Path, key: str) -> tuple[int, str]:
        """Copy `source` into storage under `key`; returns (size, sha256)."""
        tmp = self.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1024 * 1024):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            self.commit(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys_under(self, prefix: str) -> list[str]:
        """The keys stored under a folder-like prefix ("artifacts/job_x/"), sorted."""
        folder = self.path(prefix.rstrip("/"))
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root.resolve())) for p in folder.rglob("*") if p.is_file())

    def delete_under(self, prefix: str) -> None:
        """Delete every key under a folder-like prefix, and the emptied folders."""
        folder = self.path(prefix.rstrip("/"))
        shutil.rmtree(folder, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache
def get_storage() -> LocalStorage:
    return LocalStorage(get_settings().data_dir)
