"""The processes a test started, found by a marker of its own (a temp dir) in their command
line or environment, and a short Ray temp dir whose processes must be gone afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path


def processes_marked(marker: str, environ: bool = False) -> list[int]:
    """PIDs (not this one) whose command line (or environment) mentions `marker`."""
    files = ("cmdline", "environ") if environ else ("cmdline",)
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if any(marker.encode() in (d / f).read_bytes() for f in files):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def ray_tmp(prefix: str = "ds3r"):
    """A short RAY_TMPDIR (Ray's socket paths must stay short) for launches; afterwards no
    process of their Ray clusters may be left running."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield d
    finally:
        deadline = time.monotonic() + 30
        while processes_marked(d) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_marked(d)
        for pid in left:  # ours: started by these launches
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"Ray processes left running after the launch: {left}"
