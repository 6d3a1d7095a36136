"""Helpers shared by the tests: paths, the tiny training settings, bundle runners, test networks.

Test modules import them by name (``from conftest import ROOT, bundle``): pytest puts this folder
on ``sys.path`` before it imports the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.geometry import UNetGeometry
from pipeline.networks import UNet

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n auto``, the README's test command) the cores are shared out between the workers:
# torch here, and OpenMP in every process a test starts (bundle runs, torchrun, Dask workers).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CONFIGS = ROOT / "bundles/em_unet/configs"
TRAIN, INFER, EVALUATE, MULTI = (str(CONFIGS / f"{name}.yaml") for name in ("train", "inference", "evaluate", "multi_gpu_train"))

#: the narrow network of the fast tests (the paper's widths divided by 16)
FEATURES = [4, 8, 16, 32, 64]
FEATURES_ARG = "[4,8,16,32,64]"
#: a tiny training run: 5 synthetic 96 x 96 images, 2 of them for validation -> 3 iterations per epoch
TINY_TRAIN = [
    "--features", FEATURES_ARG, "--patch_size", "[220,220]", "--image_size", "[96,96]",
    "--num_images", "5", "--num_val", "2", "--optimizer_name", "adam", "--learning_rate", "0.001",
]


class BundleZygote:
    """The client of ``tests/bundle_zygote.py``: one process per test process that has imported torch,
    MONAI and ``pipeline`` and forks a ``python -m monai.bundle`` child per command (its docstring
    says why and how). Started on first use, ended with the session."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import contextlib
        import json
        import signal
        import tempfile
        import threading

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bundle_zygote.py"))], cwd=ROOT,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        with tempfile.TemporaryDirectory(prefix="bundle-run-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"args": list(args), "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            pid = json.loads(self.proc.stdout.readline())["pid"]
            ended: dict = {}  # the reply is read in a thread: the reader's buffer may already hold it
            reader = threading.Thread(target=lambda: ended.update(json.loads(self.proc.stdout.readline())), daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                reader.join()
                raise subprocess.TimeoutExpired(["python", "-m", "monai.bundle", *args], timeout, out.read_text(), err.read_text())
            returncode = ended["returncode"]
            return subprocess.CompletedProcess(["python", "-m", "monai.bundle", *args], returncode, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


ZYGOTE = BundleZygote() if os.environ.get("EM_UNET_TEST_ZYGOTE", "1") != "0" and hasattr(os, "fork") else None


def pytest_sessionfinish(session, exitstatus):
    if ZYGOTE is not None:
        ZYGOTE.close()


def bundle(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle *args`` from the repository root, output captured (unbuffered).

    The run is a forked child of the tests' bundle zygote (``tests/bundle_zygote.py``: the imports
    done once), or a plain subprocess with ``EM_UNET_TEST_ZYGOTE=0``; either way a separate process
    running MONAI's own ``monai.bundle`` entry point, with its exit status and output. ``env``:
    the process's environment (default: this one's, unbuffered)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") if env is None else env
    if ZYGOTE is not None:
        return ZYGOTE.run(list(args), ROOT, env, timeout)
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(tmp: Path, *extra: str, run_id: str = "training", configs: tuple[str, ...] = (TRAIN,)) -> list[str]:
    """The arguments of ``run <run_id>`` of the training config into ``tmp/models``, ``tmp/eval``
    and ``tmp/data``."""
    return ["run", run_id, "--config_file", str(list(configs)), "--ckpt_dir", str(tmp / "models"),
            "--output_dir", str(tmp / "eval"), "--data_cache_dir", str(tmp / "data"), *extra]


def infer(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """``run`` of the inference config with the checkpoint ``tmp/model.pt``, into ``tmp/out``."""
    return bundle("run", "--config_file", INFER, "--checkpoint", str(tmp / "model.pt"),
                  "--output_dir", str(tmp / "out"), *extra)


def tiny_net(**kwargs) -> UNet:
    """The narrow network of the fast tests (``FEATURES``), seeded, in eval mode."""
    torch.manual_seed(0)
    return UNet(features=FEATURES, **kwargs).eval()


class CentreCrop(nn.Module):
    """An 'identity' valid network: returns its input's centre, shrunk by the margin, times ``scale``.

    It has the attributes the inferer reads (``geometry``, ``spatial_dims``, ``in_channels``,
    ``features``) and counts its calls.
    """

    def __init__(self, geometry: UNetGeometry | None = None, spatial_dims: int = 2, scale: float = 2.0) -> None:
        super().__init__()
        self.geometry = geometry or UNetGeometry(depth=2)
        self.spatial_dims, self.in_channels, self.features, self.scale = spatial_dims, 1, (1,), scale
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.geometry.check_input_size(x.shape[2:])
        self.calls += 1
        m = self.geometry.margin
        return x[(..., *[slice(m, s - m) for s in x.shape[2:]])] * self.scale


@pytest.fixture
def one_thread():
    """The test machine is shared: one torch thread, restored afterwards (``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
