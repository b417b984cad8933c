"""The refusal every archive check raises, and the limits it applies."""

from __future__ import annotations

from dataclasses import dataclass

# How a zip refusal tells the user to rebuild the archive.
LISTING_HINT = "re-create it from the files themselves, e.g. `zip -r model.zip folder`"


class ArchiveRefused(ValueError):
    """An upload refused before anything reads it; code is stable snake_case, message says what to fix.

    Codes: zip_too_many_entries, zip_too_large, zip_bomb, zip_unsafe_path, zip_link_entry, zip_encrypted,
    zip_corrupt, safetensors_header_too_large, invalid_safetensors.

    Example:
        >>> raise ArchiveRefused("zip_encrypted", "the archive entry 'a.bin' is encrypted: zip it without a password")
    """

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ArchiveLimits:
    """What an upload may claim; the defaults are the service's.

    `max_ratio` applies to each entry larger than `ratio_min_bytes` once uncompressed (model weights compress
    a little, a bomb a thousandfold). `max_safetensors_header_bytes` is the safetensors library's own limit.
    """

    max_entries: int = 10_000
    max_total_uncompressed: int = 16 * 1024**3
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1024**2
    max_central_directory_bytes: int = 64 * 1024**2
    max_safetensors_header_bytes: int = 100_000_000


DEFAULT_LIMITS = ArchiveLimits()


def corrupt(message: str) -> ArchiveRefused:
    """A zip_corrupt refusal: the archive's structures contradict each other or stop short."""
    return ArchiveRefused("zip_corrupt", f"{message}: the file is truncated or damaged; upload it again")
