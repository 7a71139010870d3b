"""benchmarks/gpu_suite.py --dry-run: every step of the GPU suite starts and runs once on the
CPU (cut-down shapes, the kernels interpreted), so a GPU slot is never spent on a suite that
cannot start. Its errors against the torch references are checked here too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "suite.json"
    p = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--skip-tests",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"fp8 gemm", "mla decode", "grouped experts", "sampling", "tiny",
                        "generate"}, sections
    errors = {(r["section"], r["name"]): r["error"] for r in rows if r["error"] is not None}
    kernel_errors = {k: v for k, v in errors.items() if k[0] != "tiny"}
    assert kernel_errors and max(kernel_errors.values()) < 2e-2, kernel_errors  # bf16 outputs
    assert errors[("sampling", "4 rows x 3000")] == 0  # ids equal to the reference's
