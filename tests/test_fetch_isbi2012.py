"""Tests for scripts/fetch_isbi2012.py against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_isbi2012.py"
SHAPE = (3, 16, 20)


def _load_script():
    name = "fetch_isbi2012"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


fi = _load_script()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; records request paths; /stall/... hangs, /truncated/... lies about length."""

    requests: list[str]
    release: threading.Event

    def do_GET(self):  # noqa: N802 - http.server naming
        self.requests.append(self.path)
        if self.path.startswith("/stall/"):
            self.release.wait(5)
            return
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"II*\x00" + b"\x00" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/'served' (train-volume.tif, train-labels.tif, test-volume.tif, not-a-tiff.tif)
    on 127.0.0.1:<free port>; yields (base_url, served_dir, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(served / "train-volume.tif", rng.integers(0, 256, SHAPE, dtype=np.uint8))
    tifffile.imwrite(served / "train-labels.tif",
                     np.where(rng.random(SHAPE) < 0.2, 0, 255).astype(np.uint8))
    tifffile.imwrite(served / "test-volume.tif", rng.integers(0, 256, SHAPE, dtype=np.uint8))
    (served / "not-a-tiff.tif").write_text("<html><body>please log in</body></html>\n")

    requests: list[str] = []
    release = threading.Event()
    handler_cls = type("Handler", (_Handler,), {"requests": requests, "release": release})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(handler_cls, directory=str(served)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _fetch(names, out, base_url, checksums=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda msg: None)
    kw.setdefault("reference_md5", {})
    return fi.fetch(names, out, base_url, checksums or {}, **kw)


def test_download_with_correct_sha256(server, tmp_path):
    base_url, served, requests = server
    out = tmp_path / "out"
    names = ["train-volume.tif", "train-labels.tif"]
    checksums = {n: _sha256(served / n) for n in names}
    warnings = []
    results = _fetch(names, out, base_url, checksums, warn=warnings.append)

    assert [r.name for r in results] == names
    for r in results:
        assert r.status == "downloaded" and r.verified_by == "table"
        assert r.shape == SHAPE and r.dtype == "uint8"
        assert (out / r.name).read_bytes() == (served / r.name).read_bytes()
        assert r.sha256 == checksums[r.name]
    assert warnings == []
    assert _leftovers(out) == []
    assert fi.read_checksum_file(out / "SHA256SUMS") == checksums
    assert sorted(requests) == ["/train-labels.tif", "/train-volume.tif"]


def test_override_beats_table_and_md5_cross_check(server, tmp_path):
    base_url, served, _ = server
    out = tmp_path / "out"
    name = "train-volume.tif"
    good = _sha256(served / name)
    md5 = hashlib.md5((served / name).read_bytes()).hexdigest()
    warnings = []
    [r] = _fetch([name], out, base_url, {name: "0" * 64}, overrides={name: good.upper()},
                 reference_md5={name: md5}, warn=warnings.append)
    assert r.verified_by == "--sha256" and r.md5_reference_match is True and warnings == []

    warnings.clear()
    [r] = _fetch([name], out, base_url, {}, force=True, reference_md5={name: "f" * 32},
                 warn=warnings.append)
    assert r.md5_reference_match is False
    assert any("md5" in w and "f" * 32 in w for w in warnings)


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    base_url, served, _ = server
    out = tmp_path / "out"
    wrong = "ab" * 32
    with pytest.raises(fi.ChecksumError) as exc:
        _fetch(["train-volume.tif"], out, base_url, {"train-volume.tif": wrong})
    msg = str(exc.value)
    assert "train-volume.tif" in msg and wrong in msg and _sha256(served / "train-volume.tif") in msg
    assert "\n" not in msg
    assert not (out / "train-volume.tif").exists()
    assert _leftovers(out) == []
    assert not (out / "SHA256SUMS").exists()


def test_http_404_names_the_url(server, tmp_path):
    base_url, _, _ = server
    out = tmp_path / "out"
    with pytest.raises(fi.DownloadError) as exc:
        _fetch(["missing.tif"], out, base_url)
    msg = str(exc.value)
    assert f"{base_url}missing.tif" in msg and "404" in msg and "\n" not in msg
    assert list(out.iterdir()) == []


def test_connection_refused_names_the_url(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(fi.DownloadError) as exc:
        _fetch(["train-volume.tif"], tmp_path / "out", url, timeout=2)
    assert f"{url}train-volume.tif" in str(exc.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_timeout_names_the_url(server, tmp_path):
    base_url, _, _ = server
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(fi.DownloadError) as exc:
        _fetch(["x.tif"], out, base_url + "stall/", timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert f"{base_url}stall/x.tif" in str(exc.value) and "timed out" in str(exc.value)
    assert list(out.iterdir()) == []


def test_truncated_body_is_an_error(server, tmp_path):
    base_url, _, _ = server
    out = tmp_path / "out"
    with pytest.raises(fi.DownloadError) as exc:
        _fetch(["train-volume.tif"], out, base_url + "truncated/", timeout=2)
    assert "truncated/train-volume.tif" in str(exc.value)
    assert list(out.iterdir()) == []


def test_not_a_tiff_is_an_error_even_without_checksum(server, tmp_path):
    base_url, _, _ = server
    out = tmp_path / "out"
    with pytest.raises(fi.NotTiffError) as exc:
        _fetch(["not-a-tiff.tif"], out, base_url)
    assert "not-a-tiff.tif" in str(exc.value)
    assert list(out.iterdir()) == []  # neither the file, its .part, nor a SHA256SUMS entry


def test_existing_verified_file_is_not_downloaded_again(server, tmp_path):
    base_url, served, requests = server
    out = tmp_path / "out"
    name = "train-labels.tif"
    checksums = {name: _sha256(served / name)}
    _fetch([name], out, base_url, checksums)
    assert requests == [f"/{name}"]
    mtime = (out / name).stat().st_mtime_ns

    [r] = _fetch([name], out, base_url, checksums)
    assert r.status == "skipped" and r.shape == SHAPE
    assert requests == [f"/{name}"]  # no second request
    assert (out / name).stat().st_mtime_ns == mtime

    [r] = _fetch([name], out, base_url, checksums, force=True)
    assert r.status == "downloaded" and requests == [f"/{name}"] * 2

    (out / name).write_bytes(b"corrupted")  # a present file that fails verification is replaced
    [r] = _fetch([name], out, base_url, checksums)
    assert r.status == "downloaded" and len(requests) == 3
    assert (out / name).read_bytes() == (served / name).read_bytes()


def test_trust_on_first_use(server, tmp_path):
    base_url, served, requests = server
    out = tmp_path / "out"
    name = "test-volume.tif"
    actual = _sha256(served / name)
    warnings = []
    [r] = _fetch([name], out, base_url, {name: None}, warn=warnings.append)
    assert r.status == "downloaded" and r.verified_by is None and r.sha256 == actual
    assert len(warnings) == 1 and "NOT verified" in warnings[0] and actual in warnings[0]
    assert (out / "SHA256SUMS").read_text() == f"{actual}  {name}\n"

    # second run: verified against SHA256SUMS, nothing downloaded, no warning
    warnings.clear()
    [r] = _fetch([name], out, base_url, {name: None}, warn=warnings.append)
    assert r.status == "skipped" and r.verified_by == "SHA256SUMS" and warnings == []
    assert len(requests) == 1

    # the upstream file changes: a forced download no longer matches the recorded hash
    tifffile.imwrite(served / name, np.zeros(SHAPE, np.uint8))
    with pytest.raises(fi.ChecksumError) as exc:
        _fetch([name], out, base_url, {name: None}, force=True)
    assert "SHA256SUMS" in str(exc.value) and actual in str(exc.value)
    assert _sha256(out / name) == actual  # the verified file is kept
    assert _leftovers(out) == []


def test_sha256_override_parsing():
    assert fi.parse_sha256_overrides(["a.tif=" + "AB" * 32]) == {"a.tif": "ab" * 32}
    for bad in ["a.tif", "a.tif=123", "=" + "ab" * 32]:
        with pytest.raises(ValueError):
            fi.parse_sha256_overrides([bad])


def _run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, str(SCRIPT), "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_exit_codes(server, tmp_path):
    base_url, served, requests = server
    out = tmp_path / "cli"
    vol, lab = "train-volume.tif", "train-labels.tif"
    ok = _run_cli("--base-url", base_url, "--output-dir", str(out),
                  "--sha256", f"{vol}={_sha256(served / vol)}")
    assert ok.returncode == 0, ok.stderr
    assert f"shape {SHAPE}" in ok.stdout and "verified (--sha256)" in ok.stdout
    assert "NOT verified" in ok.stdout and "NOT verified" in ok.stderr  # labels: first use
    assert (out / vol).read_bytes() == (served / vol).read_bytes()
    assert (out / lab).read_bytes() == (served / lab).read_bytes()
    assert sorted(requests) == [f"/{lab}", f"/{vol}"]

    again = _run_cli("--base-url", base_url, "--output-dir", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": skipped,") == 2 and len(requests) == 2

    bad = _run_cli("--base-url", base_url, "--output-dir", str(tmp_path / "bad"),
                   "--files", "test-volume.tif", "--sha256", "test-volume.tif=" + "0" * 64)
    assert bad.returncode == 1
    assert "sha256 mismatch" in bad.stderr and "0" * 64 in bad.stderr
    assert _sha256(served / "test-volume.tif") in bad.stderr
    assert not (tmp_path / "bad" / "test-volume.tif").exists()

    missing = _run_cli("--base-url", base_url + "nowhere/", "--output-dir", str(tmp_path / "m"),
                       "--files", vol)
    assert missing.returncode == 1
    assert f"{base_url}nowhere/{vol}" in missing.stderr and "404" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0  # one line

    usage = _run_cli("--sha256", "nonsense")
    assert usage.returncode == 2 and "NAME=" in usage.stderr
