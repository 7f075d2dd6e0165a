"""The process server: each scaling or training point runs in a fresh process, so that no point inherits another's
threads, allocator state or peak memory.

With ``os.fork`` a "zygote" interpreter imports torch once and forks one child per point (``points.run_point``);
without it, one fresh interpreter per point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


_ZYGOTE = r"""
import json, os, sys
import torch  # imported once here; every point runs in a fresh child forked before any torch op or thread
from gamexport.bench.points import run_point
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    spec = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = run_point(spec)
        except BaseException as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(w, "wb") as f:
            f.write(json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        data = json.dumps({"error": f"the measuring process died (wait status {status}); out of memory?"}).encode()
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()
"""


class PointServer:
    """Runs scaling points, each in a fresh process.

    With ``os.fork``: a "zygote" interpreter imports torch once (started early, so its import overlaps the main
    process's own start; ``ready()`` waits for it before anything is timed) and forks one child per point, before
    any torch op or thread exists in it. Without: one fresh interpreter per point.
    """

    def __init__(self) -> None:
        self.proc = None
        self._ready = False
        if hasattr(os, "fork"):
            self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, bufsize=1)

    def ready(self) -> None:
        if self.proc is not None and not self._ready:
            line = self.proc.stdout.readline()
            if line.strip() != "ready":
                self.close()
                self.proc = None  # fall back to one interpreter per point
            self._ready = True

    def point(self, spec: dict) -> dict:
        self.ready()
        if self.proc is None:
            return _point_in_subprocess(spec)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "the measuring process exited"}

    def close(self) -> None:
        if self.proc is None:
            return
        if not self._ready:  # still importing: nothing to finish
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


def _point_in_subprocess(spec: dict) -> dict:
    """Fallback without ``os.fork``: one fresh interpreter per point."""
    code = ("import json, sys; from gamexport.bench.points import run_point; "
            "print(json.dumps(run_point(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
