"""Datalists: which files a run reads."""

from __future__ import annotations

from pathlib import Path

from pipeline.io import SUPPORTED_SUFFIXES, _suffix

IMAGE_SUFFIXES = tuple(sorted(set(SUPPORTED_SUFFIXES) | {".mrc"}))


def datalist_from_path(path: str) -> list[dict[str, str]]:
    """``[{"image": file}, ...]`` for one image file or every image file of a folder (sorted).

    A folder of 2D PNG/TIFF sections gives one item per section file, so each prediction
    keeps its section's name. Hidden files are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist, or the folder holds no image file.
        ValueError: ``path`` is a file of an unsupported format.
    """
    p = Path(path)
    if p.is_file():
        if _suffix(p) not in IMAGE_SUFFIXES:
            raise ValueError(f"{p}: unsupported image format {_suffix(p)!r}; supported: {', '.join(IMAGE_SUFFIXES)}")
        return [{"image": str(p)}]
    if not p.is_dir():
        raise FileNotFoundError(f"input path not found: {p} (give an image file or a folder of images)")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _suffix(f) in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
    return [{"image": str(f)} for f in files]
