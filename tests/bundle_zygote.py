"""A zygote for the tests' ``python -m monai.bundle`` runs: import once, fork per command.

``import monai`` costs 4-13 s on the 2-core test machines (MONAI imports most of its submodules,
scipy and pandas), and the suite runs the bundle CLI well over a hundred times. This process imports
torch, MONAI and ``pipeline`` once, computes nothing (so no OpenMP thread pool exists to be
inherited), then reads one JSON request per line on stdin and, for each, forks a child that is a
real ``python -m monai.bundle ARGS`` process in all but the imports: it moves to the request's cwd
and environment, sends its stdout/stderr to the request's files, and runs MONAI's
``monai/bundle/__main__.py`` with :func:`runpy.run_module` as ``__main__`` (``sys.argv`` as
``python -m`` sets it). The exit status is the child's own.

Protocol (one JSON object per line): request ``{"args", "cwd", "env", "stdout", "stderr"}``;
replies ``{"pid": ...}`` when the child starts, then ``{"returncode": ...}`` when it ended
(negative: killed by that signal, as :class:`subprocess.CompletedProcess` reports it).
``tests/conftest.py`` (``bundle``) is the client; ``EM_UNET_TEST_ZYGOTE=0`` turns it off.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
from typing import NoReturn


#: what a training, inference or evaluation run imports (not ``streaming``/``export``: Dask and bioimageio)
PIPELINE_MODULES = ("checkpoints", "config", "data", "geometry", "handlers", "inferers", "io", "labels", "losses", "metrics",
                    "networks", "optim", "synthetic", "tiling", "transforms")


def child(request: dict) -> NoReturn:
    """In the forked child: become ``python -m monai.bundle *args`` and exit with its status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False) for fd in (1, 2))
    sys.stdin = open(os.devnull)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # OpenMP read it when the zygote loaded it: apply it as a fresh process would
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = ["-m", *request["args"]]  # run_module(alter_sys=True) puts the module's path first
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message"): printed to stderr, status 1, as the interpreter does
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # uncaught: the traceback through sys.excepthook (pipeline.config wraps it), status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    try:  # the interpreter's exit: join non-daemon threads, then the atexit functions, then flush
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    import importlib

    # the imports a run needs, done once (the __main__ guard of monai/bundle/__main__.py keeps it from running)
    for name in ("fire", "monai.bundle.__main__", "ignite.engine", "monai.handlers", *(f"pipeline.{m}" for m in PIPELINE_MODULES)):
        importlib.import_module(name)
    # torch's import starts native helper threads, as it does before every DataLoader worker is forked;
    # a Python thread would not survive the fork (and a lock it held would stay held in the child)
    if threading.active_count() != 1:
        raise RuntimeError(f"the bundle zygote has Python threads {threading.enumerate()} after its imports; it forks with one")
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol's stream
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
