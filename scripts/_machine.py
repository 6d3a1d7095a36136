"""Helpers shared by the benchmark scripts: machine facts printed beside their numbers, memory readings, formatting."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (/proc/stat), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: ``VmHWM``, which ``execve`` resets (``ru_maxrss`` would keep the size
    the parent had when it forked a benchmark's child), else ``ru_maxrss``."""
    import resource

    return (status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    """``v`` formatted with ``spec``, or ``none`` for a missing value."""
    return none if v is None else format(v, spec)
