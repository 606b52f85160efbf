"""Facts about the machine a measurement ran on, for the records that benchmarks write."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict:
    """Return the CPU model, core counts, memory and software versions as flat values.

    The values are flat so that ``cipherprompt estimate`` can print them as ``key value`` pairs.
    Load varies during a run, so callers record ``os.getloadavg()`` themselves.
    """
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "spu": _version("spu"),
        "jax": _version("jax"),
    }


def load_now() -> dict:
    """Return the load averages over 1, 5 and 15 minutes and the output of ``uptime``.

    Other jobs on the machine slow a measurement down, so seconds measured under load are
    upper bounds. Bytes and messages do not depend on load.
    """
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        uptime = None
    return {"load_average_1_5_15_min": [one, five, fifteen], "uptime": uptime}
