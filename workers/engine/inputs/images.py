"""Image-folder zip datasets: `<class>/<image>` PNG or JPEG files, preprocessed into float32 NCHW arrays.

Classes are the folder names, sorted, and label indices follow that order (as torchvision's ImageFolder).
The preprocessing spec comes with the upload: {"resize": shorter side or [h, w], "crop": center crop size or
[h, w], "mean": [r, g, b], "std": [r, g, b]}; pixels are scaled to 0..1, then `(x - mean) / std`.
Inspection reads image headers only; loading decodes every image. Pillow opens PNG and JPEG only, and an
image's pixel count is checked before it is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from workers.engine.errors import EngineError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "Preprocess",
    "image_size",
    "list_image_folder",
    "load_images",
    "parse_preprocess",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIL_FORMATS = ("PNG", "JPEG")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std")
# Pillow warns at 89 M pixels and refuses at 179 M; calibration images are far smaller, so refuse earlier.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 64 * 1024**2
MAX_SIDE = 8192  # for resize and crop sizes
MAX_ARRAY_BYTES = 4 * 1024**3  # the float32 array that loading builds
EXAMPLE = '{"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'


@dataclass(frozen=True)
class Preprocess:
    """A validated preprocessing spec: sizes are (height, width); resize may be a shorter side (int)."""

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of a `width` × `height` image after resize (as torchvision's Resize)."""
        if isinstance(self.resize, int):
            short, long = sorted((width, height))
            scaled = int(self.resize * long / short)
            return (scaled, self.resize) if width <= height else (self.resize, scaled)
        if self.resize is not None:
            return self.resize
        return height, width

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of a `width` × `height` image after resize and crop."""
        return self.crop if self.crop is not None else self.resized_size(width, height)


def _size(key: str, value: Any) -> int | tuple[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE

    if ok(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(ok(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise EngineError(
        "invalid_dataset",
        f"preprocess {key} is {value!r}: give a size in pixels (1..{MAX_SIDE}) or [height, width]; e.g. {EXAMPLE}",
    )


def _triple(key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    numbers = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if not numbers or (positive and any(v <= 0 for v in value)):
        what = "three positive numbers" if positive else "three numbers"
        raise EngineError(
            "invalid_dataset",
            f"preprocess {key} is {value!r}: give {what}, one per RGB channel; e.g. {EXAMPLE}",
        )
    return (float(value[0]), float(value[1]), float(value[2]))


def parse_preprocess(spec: Mapping[str, Any] | None) -> Preprocess:
    """Validate a preprocessing spec (the upload's `preprocess` JSON); None means no resize, crop or norm.

    Raises:
        EngineError: invalid_dataset naming the bad key and giving an example.

    Example:
        >>> parse_preprocess({"resize": 256, "crop": 224}).output_size(640, 480)
        (224, 224)
    """
    if spec is None:
        return Preprocess()
    if not isinstance(spec, Mapping):
        raise EngineError("invalid_dataset", f"preprocess must be a JSON object, e.g. {EXAMPLE}")
    unknown = sorted(set(spec) - set(PREPROCESS_KEYS))
    if unknown:
        raise EngineError(
            "invalid_dataset",
            f"preprocess has unknown keys {', '.join(map(repr, unknown))}: use {', '.join(PREPROCESS_KEYS)}",
        )
    resize, crop, mean, std = (spec.get(key) for key in PREPROCESS_KEYS)
    if crop is not None:
        crop = _size("crop", crop)
        crop = (crop, crop) if isinstance(crop, int) else crop
    return Preprocess(
        resize=None if resize is None else _size("resize", resize),
        crop=crop,
        mean=(0.0, 0.0, 0.0) if mean is None else _triple("mean", mean, positive=False),
        std=(1.0, 1.0, 1.0) if std is None else _triple("std", std, positive=True),
    )


@dataclass
class ImageFolder:
    """The images of a zip in label order: `entries` are (zip entry name, label index)."""

    classes: list[str]
    entries: list[tuple[str, int]]


def _ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.startswith("__MACOSX/") or any(p.startswith(".") for p in parts) or parts[-1] == "Thumbs.db"


def list_image_folder(zf: zipfile.ZipFile, names: list[str]) -> ImageFolder | None:
    """The image folder layout of an archive, or None when it holds no image at all.

    `<class>/<image>`, optionally under one top folder. Hidden files and macOS metadata are skipped.

    Raises:
        EngineError: invalid_dataset when a file is outside a class folder or is not a PNG or JPEG.
    """
    files = [n for n in names if not n.endswith("/") and not _ignored(n)]
    if not any(n.lower().endswith(IMAGE_SUFFIXES) for n in files):
        return None
    split = [PurePosixPath(n).parts for n in files]
    tops = {parts[0] for parts in split}
    strip = 1 if len(tops) == 1 and all(len(parts) == 3 for parts in split) else 0
    by_class: dict[str, list[str]] = {}
    for name, parts in zip(files, split, strict=True):
        if len(parts) - strip != 2:
            raise EngineError(
                "invalid_dataset",
                f"entry {name!r} is not <class>/<image>: put each image in a folder named after its class",
            )
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise EngineError("invalid_dataset", f"entry {name!r} is not a .png, .jpg or .jpeg image")
        by_class.setdefault(parts[strip], []).append(name)
    classes = sorted(by_class)
    entries = [(n, label) for label, c in enumerate(classes) for n in sorted(by_class[c])]
    return ImageFolder(classes, entries)


def _plan(spec: Preprocess, width: int, height: int, name: str) -> tuple[tuple[int, int], Any]:
    """The (height, width) after resize and the center crop box (left, top, right, bottom) or None.

    The crop is placed as torchvision's CenterCrop places it. Raises invalid_dataset when the resized image
    would be too large (a thin image resized by its shorter side) or smaller than the crop.
    """
    resized = spec.resized_size(width, height)
    if resized[0] * resized[1] > MAX_IMAGE_PIXELS:
        raise EngineError(
            "invalid_dataset",
            f"image {name!r} ({width}x{height}) would be {resized[1]}x{resized[0]} pixels after resize; "
            f"at most {MAX_IMAGE_PIXELS} are accepted: lower preprocess resize",
        )
    if spec.crop is None:
        return resized, None
    (h, w), (crop_h, crop_w) = resized, spec.crop
    if crop_h > h or crop_w > w:
        raise EngineError(
            "invalid_dataset",
            f"image {name!r} is {w}x{h} after resize, smaller than the {crop_w}x{crop_h} crop: "
            "make preprocess resize at least the crop size",
        )
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return resized, (left, top, left + crop_w, top + crop_h)


def _open(zf: zipfile.ZipFile, name: str) -> Any:
    """A PNG or JPEG image, opened lazily (header read, pixels not decoded), its pixel count checked."""
    from PIL import Image, UnidentifiedImageError

    if zf.getinfo(name).file_size > MAX_IMAGE_BYTES:
        raise EngineError("invalid_dataset", f"image {name!r} is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(zf.read(name)), formats=PIL_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise EngineError("invalid_dataset", f"image {name!r} has too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise EngineError("invalid_dataset", f"entry {name!r} is not a readable PNG or JPEG image") from exc
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise EngineError(
            "invalid_dataset",
            f"image {name!r} is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} are accepted: shrink it",
        )
    return image


def _pixels(image: Any, spec: Preprocess, name: str) -> np.ndarray:
    """Decode, resize, crop and normalize one image into a float32 [3, H, W] array."""
    from PIL import Image

    try:
        size, box = _plan(spec, image.width, image.height, name)
        image = image.convert("RGB")
        if size != (image.height, image.width):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        if box is not None:
            image = image.crop(box)
        pixels = np.asarray(image, dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as exc:
        raise EngineError("invalid_dataset", f"image {name!r} could not be decoded ({exc})") from exc
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    normalized = (pixels / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(normalized.transpose(2, 0, 1), dtype=np.float32)


def _same_size(sizes: Iterator[tuple[str, tuple[int, int]]], count: int) -> tuple[int, int]:
    first: tuple[str, tuple[int, int]] | None = None
    for name, size in sizes:
        if first is None:
            first = (name, size)
        elif size != first[1]:
            raise EngineError(
                "invalid_dataset",
                f"images differ in size after preprocessing ({first[0]!r} is {first[1][1]}x{first[1][0]}, "
                f"{name!r} is {size[1]}x{size[0]}): give preprocess resize and crop, e.g. {EXAMPLE}",
            )
    assert first is not None  # list_image_folder found at least one image
    height, width = first[1]
    if count * 3 * height * width * 4 > MAX_ARRAY_BYTES:
        raise EngineError(
            "invalid_dataset",
            f"{count} images of {width}x{height} need more than {MAX_ARRAY_BYTES} bytes as float32: "
            "use fewer images or a smaller preprocess crop",
        )
    return height, width


def image_size(zf: zipfile.ZipFile, folder: ImageFolder, spec: Preprocess) -> tuple[int, int]:
    """The (height, width) every image has after preprocessing, from the image headers only.

    Raises:
        EngineError: invalid_dataset when an image is unreadable, too large, smaller than the crop, or when
            sizes differ.
    """

    def sizes() -> Iterator[tuple[str, tuple[int, int]]]:
        for name, _ in folder.entries:
            with _open(zf, name) as image:
                _plan(spec, image.width, image.height, name)  # raises for a too-small or too-large image
                yield name, spec.output_size(image.width, image.height)

    return _same_size(sizes(), len(folder.entries))


def load_images(zf: zipfile.ZipFile, folder: ImageFolder, spec: Preprocess) -> dict[str, np.ndarray]:
    """Decode and preprocess every image: {"x": float32 [N, 3, H, W], "labels": int64 [N]}.

    Raises:
        EngineError: as image_size, and when an image cannot be decoded.
    """
    height, width = image_size(zf, folder, spec)
    x = np.empty((len(folder.entries), 3, height, width), np.float32)
    for i, (name, _) in enumerate(folder.entries):
        with _open(zf, name) as image:
            x[i] = _pixels(image, spec, name)
    labels = np.asarray([label for _, label in folder.entries], np.int64)
    return {"x": x, "labels": labels}
