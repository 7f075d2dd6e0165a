"""The machine a timing was taken on: its CPU, the flags that decide kernels, its last-level cache, library
versions, and how much other work shared the cores meanwhile. Core (standard library only): the build's report,
the manifest, the bench and the trainer's comparisons all record these facts beside their numbers.
"""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU features that decide which kernels ONNX Runtime and torch can use (``cpu_flags``).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> dict[str, bool] | None:
    """Which of ``CPU_FLAGS`` the first CPU in /proc/cpuinfo has; None where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return {flag: flag in have for flag in CPU_FLAGS}
    except OSError:
        pass
    return None


def llc_bytes() -> int | None:
    """Size of the last-level cache in bytes: the highest-level data or unified cache of cpu0 in
    /sys/devices/system/cpu/cpu0/cache, else ``os.sysconf``; None where neither says."""
    from pathlib import Path

    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        try:
            nbytes = int(size.rstrip("KMG")) * scale
        except ValueError:
            continue
        if best is None or (level, nbytes) > best:
            best = (level, nbytes)
    if best is not None:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if value and value > 0:
            return int(value)
    return None


def machine_info(threads: int | None) -> dict:
    """What the timings were measured on: CPU, its kernel-deciding flags, cores, threads, and library versions."""
    from importlib import metadata

    versions = {}
    for dist in ("gamexport", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "llc_bytes": llc_bytes(), "cores": os.cpu_count(),
            "threads": threads, "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions}


# ---- other work on the machine ---------------------------------------------------------------------------------
#: A run during which other processes used more than this many cores, on average, is marked busy: its timings
#: are void (``gamexport bench`` and ``python -m gamexport.training.compare`` both use it).
BUSY_CORES = 0.2


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this process and its waited-for children have used), or
    None where /proc/stat is missing. The difference over a run is what OTHER work took from the cores meanwhile —
    unlike the load average, it does not count the run's own threads (or the previous run's, which linger in a
    one-minute average)."""
    import resource
    from pathlib import Path

    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")      # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own


def other_cpu_cores(before, after, wall: float) -> float | None:
    """Cores' worth of CPU that other processes used, on average, while a run took ``wall`` seconds (from two
    :func:`cpu_seconds` readings); None when either reading is missing."""
    if before is None or after is None or wall <= 0:
        return None
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall, 3)
