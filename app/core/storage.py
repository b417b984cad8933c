"""Where uploads and artifacts live, keyed by generated names: local files under DATA_DIR (the default) or an
S3-compatible bucket (QAAS_STORAGE_URL=s3://bucket/prefix). Both stream through local temporary files, so a
reader never sees half an object, and both hand the runner local files only (`local_copy`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from app.core.config import Settings, get_settings

CHUNK_BYTES = 1024 * 1024


class StoredFileMissing(FileNotFoundError):
    """The key has no stored file (removed outside qaas)."""


# What store_file copies: a path (opened without following a link) or an open binary file (read from its start).
Source = Path | IO[bytes]


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[IO[bytes]]:
    """The source as an open binary file: a path is opened with O_NOFOLLOW and must be a regular file."""
    if not isinstance(source, Path):
        source.seek(0)
        yield source
        return
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{source} is not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as handle:
        yield handle


class Storage(Protocol):
    def temp_path(self, suffix: str = ".part") -> Path:
        """A fresh name for a local temporary file (uploads stream there first)."""
        ...

    def commit(self, tmp_path: Path, key: str, *, sha256: str | None = None) -> None:
        """Store the finished temporary file under `key`; the temporary file is gone afterwards."""
        ...

    def store_file(self, source: Source, key: str) -> tuple[int, str]:
        """Copy `source` (a path, never followed if a link, or an open binary file) into storage under `key`;
        returns (size, sha256)."""
        ...

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """A local file holding `key`'s bytes: the stored file itself, or a copy downloaded into `dest_dir`."""
        ...

    def delete(self, key: str) -> None: ...

    def keys_under(self, prefix: str) -> list[str]:
        """The keys stored under a folder-like prefix ("artifacts/job_x/"), sorted."""
        ...

    def delete_under(self, prefix: str) -> None:
        """Delete every key under a folder-like prefix."""
        ...


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"

    def temp_path(self, suffix: str = ".part") -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{secrets.token_hex(16)}{suffix}"

    def path(self, key: str) -> Path:
        """The file of `key`: plain names under the root, and no symbolic link on the way (none is ever made
        there; one found is refused, never followed)."""
        parts = key.split("/")
        if key.startswith("/") or any(part in ("", ".", "..") or "\\" in part for part in parts):
            raise ValueError(f"storage key escapes the data directory: {key!r}")
        path = self.root.resolve()
        for part in parts:
            path = path / part
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise ValueError(f"storage key {key!r} passes through a symbolic link")
        return path

    def commit(self, tmp_path: Path, key: str, *, sha256: str | None = None) -> None:
        """fsync `tmp_path` and move it to `key` atomically (the row keeps the sha256)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)

    def store_file(self, source: Source, key: str) -> tuple[int, str]:
        """Copy `source` into storage under `key`; returns (size, sha256)."""
        tmp = self.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with _opened(source) as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            self.commit(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """The stored file itself: nothing is copied."""
        return self.path(key)

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


@dataclass
class ObjectRead:
    """An open S3 object (or the requested range of it): `chunks()` streams it and closes it at the end."""

    body: Any
    length: int
    content_range: str | None

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.body.iter_chunks(CHUNK_BYTES)
        finally:
            self.body.close()


class S3Storage:
    """Objects in an S3-compatible bucket under `prefix`. Uploads and artifacts are written from a local file
    with boto3's managed (multipart) transfer, their sha256 kept as object metadata; `local_copy` downloads."""

    def __init__(
        self, bucket: str, prefix: str, tmp_dir: Path, client: Any, *, page_size: int = 1000
    ) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.tmp_dir = tmp_dir
        self.client = client
        self.page_size = page_size

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        import boto3  # only where S3 is configured: the local default needs no boto3
        from botocore.config import Config

        url = urlsplit(settings.storage_url)
        credentials = {}
        if settings.s3_access_key_id:  # else boto3's own chain: AWS_* variables, shared files, instance roles
            credentials = {
                "aws_access_key_id": settings.s3_access_key_id,
                "aws_secret_access_key": settings.s3_secret_access_key,
            }
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            # MinIO and most S3-compatible servers address buckets by path, not by host name.
            config=Config(
                s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
                retries={"mode": "standard"},
            ),
            **credentials,
        )
        return cls(url.netloc, url.path, settings.data_dir / "tmp", client)

    def object_name(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key escapes the bucket prefix: {key!r}")
        return self.prefix + key

    def temp_path(self, suffix: str = ".part") -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{secrets.token_hex(16)}{suffix}"

    def commit(self, tmp_path: Path, key: str, *, sha256: str | None = None) -> None:
        """Upload `tmp_path` (multipart when large), then delete it."""
        if sha256 is None:
            sha256 = _sha256_of(tmp_path)
        self.client.upload_file(
            str(tmp_path), self.bucket, self.object_name(key), ExtraArgs={"Metadata": {"sha256": sha256}}
        )
        tmp_path.unlink(missing_ok=True)

    def store_file(self, source: Source, key: str) -> tuple[int, str]:
        with _opened(source) as handle:
            digest, size = hashlib.sha256(), 0
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
            handle.seek(0)
            self.client.upload_fileobj(
                handle,
                self.bucket,
                self.object_name(key),
                ExtraArgs={"Metadata": {"sha256": digest.hexdigest()}},
            )
        return size, digest.hexdigest()

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """Download `key` into `dest_dir` (streamed to a temporary name, then renamed by boto3)."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / key.replace("/", "_")
        try:
            self.client.download_file(self.bucket, self.object_name(key), str(target))
        except Exception as exc:
            if _is_missing(exc):
                raise StoredFileMissing(
                    f"s3://{self.bucket}/{self.object_name(key)} does not exist"
                ) from None
            raise
        return target

    def open(self, key: str, byte_range: str | None = None) -> ObjectRead:
        """The object, or the one range `byte_range` ("bytes=0-99") names; StoredFileMissing when absent."""
        args = {"Bucket": self.bucket, "Key": self.object_name(key)}
        if byte_range:
            args["Range"] = byte_range
        try:
            response = self.client.get_object(**args)
        except Exception as exc:
            if _is_missing(exc):
                raise StoredFileMissing(f"s3://{self.bucket}/{args['Key']} does not exist") from None
            raise
        return ObjectRead(response["Body"], response["ContentLength"], response.get("ContentRange"))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))

    def _names_under(self, prefix: str) -> Iterator[list[str]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            # "attempt-1" must not take "attempt-10" along: a prefix is a folder.
            Prefix=self.object_name(prefix.rstrip("/") + "/"),
            PaginationConfig={"PageSize": self.page_size},
        )
        for page in pages:
            yield [item["Key"] for item in page.get("Contents", [])]

    def keys_under(self, prefix: str) -> list[str]:
        return sorted(name[len(self.prefix) :] for page in self._names_under(prefix) for name in page)

    def delete_under(self, prefix: str) -> None:
        """Delete in batches of at most 1000 keys (the limit of one DeleteObjects call)."""
        names = [name for page in self._names_under(prefix) for name in page]
        for start in range(0, len(names), 1000):
            batch = [{"Key": name} for name in names[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in {
        "404",
        "NoSuchKey",
        "NotFound",
    }


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache
def get_storage() -> Storage:
    settings = get_settings()
    if settings.storage_url:
        return S3Storage.from_settings(settings)
    return LocalStorage(settings.data_dir)
