"""Safety checks for a hostile uploaded file, run on disk right after it was streamed and before anything reads it.

Zip archives (torch.export programs, TorchScript archives, zipped Hugging Face models, image folders, `.npz`)
are checked from their own structures, never with `zipfile.ZipFile`, so that memory stays small whatever the
archive claims: the end-of-central-directory record is found the way `zipfile` finds it (so both see the
same archive), its counts and sizes are checked before anything else, then the central directory is walked in
chunks, entry by entry, stopping as soon as a limit is broken. Each `.safetensors` entry's header is checked
from the entry's first bytes, without extracting it. Bare safetensors files get the same header check.

Only the stdlib is imported: the API and the engine share these rules.

Every refusal is an `ArchiveRefused` with a stable code; messages about a zip begin with "the archive", so a
caller may name it ("the model archive").

The package, by part: `end_record` (the end-of-central-directory record), `directory` (the central
directory walk), `streams` (the decompressing readers), `safetensors_header` (the header check), `checks` (the
calls re-exported here); `refusal`, `layout` and `source` hold what they share.

Example:
    >>> check_upload("/data/uploads/3f2a.part", "model.pt2")  # raises ArchiveRefused, or returns None
"""

from qaas.contract.archives.checks import check_safetensors_file, check_upload, check_zip_file, is_zip
from qaas.contract.archives.refusal import ArchiveLimits, ArchiveRefused

__all__ = [
    "ArchiveLimits",
    "ArchiveRefused",
    "check_safetensors_file",
    "check_upload",
    "check_zip_file",
    "is_zip",
]
