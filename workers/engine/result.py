"""What a quantization returns, and the progress callback it reports through."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ArtifactFile", "ProgressFn", "QuantResult", "atomic_write", "sha256_file", "write_json"]

ProgressFn = Callable[[str, float, str], None]
"""(stage, percent 0-100, message); stages: loading, calibrating, training, converting, saving, verifying,
benchmarking, saving."""


@dataclass
class ArtifactFile:
    """A file the job produced: `name` is the fixed artifact name, `format` what loads it."""

    name: str
    path: Path
    format: str
    size_bytes: int = 0
    sha256: str = ""


@dataclass
class QuantResult:
    """The outcome of `quantize`: the chosen backend, files, metrics (docs/architecture.md) and how to load."""

    backend: str
    artifacts: list[ArtifactFile]
    metrics: dict[str, Any]
    load_snippet: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, relative_to: str | Path | None = None) -> dict[str, Any]:
        """JSON-ready form; each artifact's `file` is relative to `relative_to` when given."""
        base = Path(relative_to) if relative_to is not None else None
        artifacts = []
        for a in self.artifacts:
            file = a.path.relative_to(base) if base is not None else a.path
            entry = {"name": a.name, "file": str(file), "format": a.format}
            artifacts.append(entry | {"size_bytes": a.size_bytes, "sha256": a.sha256})
        return {
            "backend": self.backend,
            "artifacts": artifacts,
            "metrics": self.metrics,
            "load_snippet": self.load_snippet,
            "manifest": self.manifest,
        }


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a file under a temporary name in its folder, fsync it, then rename it into place.

    A reader never sees a half-written artifact, and a crash leaves at most a stray temporary file.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (see atomic_write)."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
