#!/usr/bin/env python
"""Download the public ISBI 2012 EM segmentation training data, with checksum verification.

The ISBI 2012 challenge "Segmentation of neuronal structures in EM stacks"
(http://brainiac2.mit.edu/isbi_challenge/) published three multi-page TIFF stacks,
each 30 x 512 x 512 uint8 (Drosophila ssTEM, 4 x 4 x 50 nm):

- ``train-volume.tif``  raw images,
- ``train-labels.tif``  labels (255 = cell interior, 0 = membrane),
- ``test-volume.tif``   test images (no public labels; optional).

Sources (``--base-url``; a file ``NAME`` is fetched from ``BASE_URL/NAME``):

- default: ``https://raw.githubusercontent.com/alexklibisz/isbi-2012/master/data/``, a public
  GitHub copy of the three files that needs no registration (the same mirror is used by other
  public download scripts);
- the challenge site ``http://brainiac2.mit.edu/isbi_challenge/sites/default/files/`` (the
  original location, linked e.g. by NVIDIA DeepLearningExamples' U-Net medical README; it has
  historically required registration, in which case it answers with an HTML page, which this
  script rejects as "not a TIFF");
- any other mirror, an HTTP server of your own or a ``file://`` folder.

Verification. Each file is streamed into ``OUTPUT_DIR/.NAME.part`` while its SHA-256 is
computed; only a file whose hash matches the expected one *and* that opens as a TIFF with
tifffile is moved into place (``os.replace``). On any failure the ``.part`` file is removed and
the script exits non-zero with a one-line message. The expected SHA-256 of a file comes from,
in this order:

1. ``--sha256 NAME=HEX`` on the command line,
2. the table ``SHA256`` below (all ``None``: no SHA-256 of these files is published that we
   could find, and we do not make one up),
3. ``OUTPUT_DIR/SHA256SUMS`` (``sha256sum`` format) written by an earlier run.

With none of those the file is accepted on first use: its SHA-256 is printed, recorded in
``SHA256SUMS`` and a warning says that it was not verified; later runs verify against that record.
To accept a changed upstream file, delete its line from ``SHA256SUMS`` (or pass ``--sha256``).

As an independent cross-check, the MD5 of every file is compared with the MD5s published for
the challenge-site files in an (unmerged) torchvision pull request (table ``REFERENCE_MD5``);
the result is reported, and a difference is a warning, not an error.

Files already in ``OUTPUT_DIR`` whose SHA-256 matches the expected one are not downloaded
again (``--force`` downloads anyway); a present file that cannot be verified (no expected hash,
or a different one) is downloaded again.

Usage::

    python scripts/fetch_isbi2012.py                          # train volume + labels -> data/isbi2012
    python scripts/fetch_isbi2012.py --files train-volume.tif train-labels.tif test-volume.tif
    python scripts/fetch_isbi2012.py --base-url http://brainiac2.mit.edu/isbi_challenge/sites/default/files/
    python scripts/fetch_isbi2012.py --sha256 train-volume.tif=<64 hex digits> --output-dir /data/isbi

Only the standard library does the HTTP (``urllib.request``); tifffile checks the files and tqdm
(if installed) shows progress.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/alexklibisz/isbi-2012/master/data/"
"""Public copy of the challenge files (GitHub repository alexklibisz/isbi-2012, folder data/);
used as the ISBI 2012 download location by other public scripts that fetch it without
registration."""

OFFICIAL_BASE_URL = "http://brainiac2.mit.edu/isbi_challenge/sites/default/files/"
"""The challenge site's file folder (historically behind a registration)."""

DEFAULT_OUTPUT_DIR = os.path.join("data", "isbi2012")
DEFAULT_FILES = ("train-volume.tif", "train-labels.tif")
ALL_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
CHECKSUM_FILE = "SHA256SUMS"
DEFAULT_TIMEOUT = 60.0
CHUNK_SIZE = 1 << 16

# Expected SHA-256 per file. None = unknown: no published SHA-256 of the raw TIFFs was found
# (torch-em publishes one, but for its own converted HDF5 "isbi.h5", not for these files).
# Fill in only from a source you trust, or pass --sha256 NAME=HEX.
SHA256: dict[str, str | None] = {
    "train-volume.tif": None,
    "train-labels.tif": None,
    "test-volume.tif": None,
}

# MD5s of the challenge-site files as published in pytorch/vision pull request #900
# ("Add ssTEM dataset", closed unmerged; torchvision/datasets/sstem.py, ``meta`` with
# base_url http://brainiac2.mit.edu/isbi_challenge/sites/default/files/). Third-party and
# never merged, so they are only an informational cross-check here, not a verification.
REFERENCE_MD5: dict[str, str] = {
    "train-volume.tif": "465461edbe0254630c4ec5577f1e7764",
    "train-labels.tif": "657fe6b728c6dd0152e295c6d800001d",
    "test-volume.tif": "9767660d7abe4e0ecbdd0061a16058ad",
}
REFERENCE_MD5_SOURCE = "pytorch/vision PR #900 (torchvision/datasets/sstem.py)"

# Shape and dtype of every file as described by the challenge; a difference is a warning.
EXPECTED_SHAPE = (30, 512, 512)
EXPECTED_DTYPE = "uint8"

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class FetchError(RuntimeError):
    """A download, verification or TIFF check failed; the message is one line."""


class DownloadError(FetchError):
    """The URL could not be fetched (connection error, HTTP error, timeout, truncated body)."""


class ChecksumError(FetchError):
    """The SHA-256 of a downloaded file differs from the expected one."""


class NotTiffError(FetchError):
    """A downloaded file does not open as a TIFF."""


@dataclass
class FileResult:
    name: str
    path: Path
    sha256: str
    status: str  # "downloaded" or "skipped" (already present and verified)
    verified_by: str | None  # "--sha256", "table", "SHA256SUMS", or None (trust on first use)
    shape: tuple[int, ...]
    dtype: str
    md5: str
    md5_reference_match: bool | None  # None: no reference MD5 for this name


# --------------------------------------------------------------------------- checksums


def parse_sha256_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["NAME=HEX", ...]`` -> ``{NAME: hex}``; raises ValueError on a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, digest = item.partition("=")
        name, digest = name.strip(), digest.strip()
        if not sep or not name or not _HEX64.match(digest):
            raise ValueError(f"--sha256 expects NAME=<64 hex digits>, got {item!r}")
        out[name] = digest.lower()
    return out


def read_checksum_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``sha256sum``-style file (``HEX  NAME`` or ``HEX *NAME`` per line)."""
    sums: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return sums
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not _HEX64.match(parts[0]):
            raise FetchError(f"{path}:{lineno}: not a 'SHA256  NAME' line: {line!r}")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def write_checksum_file(path: str | os.PathLike, sums: Mapping[str, str]) -> None:
    """Write ``sums`` atomically in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text("".join(f"{sums[name]}  {name}\n" for name in sorted(sums)), encoding="utf-8")
    os.replace(tmp, path)


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


# --------------------------------------------------------------------------- download


def file_url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(name)


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a project dependency
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, disable=None)  # disable=None: off when stderr is not a terminal


def download(url: str, dest: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT,
             progress: bool = True) -> tuple[str, str, int]:
    """Stream ``url`` into ``dest`` and return its (sha256, md5, size).

    Raises DownloadError (one line, naming the URL) on connection errors, HTTP errors,
    timeouts and bodies shorter than their Content-Length. ``dest`` may be left behind on
    error; the caller removes it.
    """
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    request = urllib.request.Request(url, headers={"User-Agent": "fetch_isbi2012/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            bar = _progress(expected, os.path.basename(str(dest)).lstrip(".").removesuffix(".part"),
                            progress)
            try:
                with open(dest, "wb") as out:
                    while True:
                        chunk = response.read(CHUNK_SIZE)
                        if not chunk:
                            break
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        size += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"failed to download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise DownloadError(f"failed to download {url}: timed out after {timeout:g} s") from None
        raise DownloadError(f"failed to download {url}: {reason}") from None
    except (socket.timeout, TimeoutError):
        raise DownloadError(f"failed to download {url}: timed out after {timeout:g} s") from None
    except (http.client.HTTPException, ConnectionError) as e:
        raise DownloadError(f"failed to download {url}: {type(e).__name__}: {e}") from None
    except OSError as e:  # e.g. a file:// URL that does not exist
        raise DownloadError(f"failed to download {url}: {e}") from None
    if expected is not None and size != expected:
        raise DownloadError(f"failed to download {url}: got {size} of {expected} bytes "
                            "(connection closed early)")
    return sha.hexdigest(), md5.hexdigest(), size


def check_tiff(path: str | os.PathLike, name: str | None = None) -> tuple[tuple[int, ...], str]:
    """Open ``path`` with tifffile and read all pages; return (shape, dtype) or raise NotTiffError."""
    import tifffile

    label = name or os.fspath(path)
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray()
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise NotTiffError(f"{label} is not a readable TIFF ({type(e).__name__}: {e})") from None
    return tuple(int(s) for s in data.shape), str(data.dtype)


# --------------------------------------------------------------------------- fetch


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _md5_match(name: str, md5: str, reference_md5: Mapping[str, str]) -> bool | None:
    ref = reference_md5.get(name)
    return None if ref is None else md5 == ref.lower()


def fetch(
    files: Iterable[str] = DEFAULT_FILES,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    base_url: str = DEFAULT_BASE_URL,
    checksums: Mapping[str, str | None] | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    reference_md5: Mapping[str, str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> list[FileResult]:
    """Download ``files`` from ``base_url`` into ``output_dir``, verifying each one.

    ``checksums``: expected SHA-256 per name (None = unknown; default: the table ``SHA256``).
    ``overrides``: expected SHA-256 per name that take precedence (``--sha256``).
    Names with no expected SHA-256 fall back to ``output_dir/SHA256SUMS``, and without an entry
    there are accepted on first use and recorded. Raises FetchError (DownloadError,
    ChecksumError, NotTiffError) on the first failure, leaving no partial file behind.
    """
    if warn is None:
        def warn(msg: str) -> None:
            print(f"warning: {msg}", file=sys.stderr)
    checksums = dict(SHA256 if checksums is None else checksums)
    overrides = {k: v.lower() for k, v in (overrides or {}).items()}
    reference_md5 = REFERENCE_MD5 if reference_md5 is None else reference_md5
    files = list(dict.fromkeys(files))  # keep order, drop duplicates
    for name in files:
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == CHECKSUM_FILE:
            raise FetchError(f"invalid file name {name!r}")

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sums_path = out_dir / CHECKSUM_FILE
    recorded = read_checksum_file(sums_path)
    results: list[FileResult] = []

    for name in files:
        if name in overrides:
            expected, source = overrides[name], "--sha256"
        elif checksums.get(name):
            expected, source = str(checksums[name]).lower(), "table"
        elif name in recorded:
            expected, source = recorded[name], CHECKSUM_FILE
        else:
            expected, source = None, None

        final = out_dir / name
        url = file_url(base_url, name)

        # 1. an existing file that verifies is kept
        if final.exists() and not force:
            sha, md5 = file_digests(final)
            if expected is not None and sha == expected:
                shape, dtype = check_tiff(final, name)
                log(f"{name}: present, sha256 verified ({source}), skipped download")
                results.append(FileResult(name, final, sha, "skipped", source, shape, dtype, md5,
                                          _md5_match(name, md5, reference_md5)))
                if recorded.get(name) != sha:
                    recorded[name] = sha
                    write_checksum_file(sums_path, recorded)
                continue
            if expected is None:
                log(f"{name}: present but no known sha256 to verify it against, downloading again")
            else:
                log(f"{name}: present but sha256 {sha} != expected {expected} ({source}), "
                    "downloading again")

        # 2. download into .NAME.part, verify, then move into place
        part = out_dir / f".{name}.part"
        log(f"{name}: downloading {url}")
        try:
            sha, md5, size = download(url, part, timeout=timeout, progress=progress)
            if expected is not None and sha != expected:
                raise ChecksumError(f"{name}: sha256 mismatch for {url}: expected {expected} "
                                    f"({source}), got {sha}")
            shape, dtype = check_tiff(part, f"{name} (from {url})")
            os.replace(part, final)
        finally:
            _remove(part)

        if expected is None:
            warn(f"{name}: sha256 {sha} NOT verified (no known checksum); recorded in "
                 f"{sums_path} (trust on first use; later runs verify against it)")
        else:
            log(f"{name}: sha256 verified ({source})")
        if recorded.get(name) != sha:
            recorded[name] = sha
            write_checksum_file(sums_path, recorded)
        match = _md5_match(name, md5, reference_md5)
        results.append(FileResult(name, final, sha, "downloaded", source, shape, dtype, md5, match))
        log(f"{name}: {size} bytes, shape {shape}, {dtype}")

    for r in results:
        if r.md5_reference_match is False:
            warn(f"{r.name}: md5 {r.md5} differs from {reference_md5[r.name]} published in "
                 f"{REFERENCE_MD5_SOURCE}")
    return results


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download the ISBI 2012 EM segmentation data (multi-page TIFFs) with "
                    "SHA-256 verification.",
        epilog=f"Official location: {OFFICIAL_BASE_URL} (may require registration). "
               f"Expected checksums are recorded in OUTPUT_DIR/{CHECKSUM_FILE}.")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="folder to download into (default: %(default)s, relative to the "
                        "current directory)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="URL of the folder holding the files; NAME is fetched from "
                        "BASE_URL/NAME (default: %(default)s)")
    p.add_argument("--files", nargs="+", choices=ALL_FILES, default=list(DEFAULT_FILES),
                   metavar="NAME",
                   help=f"files to fetch, any of {', '.join(ALL_FILES)} "
                        f"(default: {' '.join(DEFAULT_FILES)})")
    p.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                   help="expected SHA-256 of file NAME (repeatable); overrides the built-in "
                        f"table and {CHECKSUM_FILE}")
    p.add_argument("--force", action="store_true",
                   help="download even files that are present and verify")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="network timeout in seconds for connecting and for each read "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_sha256_overrides(args.sha256)
    except ValueError as e:
        parser.error(str(e))
    unknown = sorted(set(overrides) - set(ALL_FILES))
    if unknown:
        parser.error(f"--sha256 for unknown file(s) {', '.join(unknown)}; "
                     f"known: {', '.join(ALL_FILES)}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")

    try:
        results = fetch(args.files, args.output_dir, args.base_url, SHA256, overrides=overrides,
                        force=args.force, timeout=args.timeout, progress=not args.no_progress)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # output folder not writable, disk full, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

    for r in results:
        if r.shape != EXPECTED_SHAPE or r.dtype != EXPECTED_DTYPE:
            print(f"warning: {r.name} has shape {r.shape} {r.dtype}, the challenge's files are "
                  f"{EXPECTED_SHAPE} {EXPECTED_DTYPE}", file=sys.stderr)
        verified = f"verified ({r.verified_by})" if r.verified_by else "NOT verified (first use)"
        md5 = {True: f", md5 matches {REFERENCE_MD5_SOURCE}", False: ", md5 differs from reference",
               None: ""}[r.md5_reference_match]
        print(f"{r.path}: {r.status}, shape {r.shape} {r.dtype}, sha256 {r.sha256} {verified}{md5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
