"""Which of the package's files one JSONL line's path runs through, driver and ranks.

    python benchmarks/trace_request_path.py [--layout pp2ep2] [--keep DIR]

The launch's own path on the tiny model (synthesized into the cache on first use): the engine
is built first (start-up is not the request's path), then `launch.run` reads a one-line JSONL
input, runs the batch job on that engine and writes the record. Every process (the driver and
each Ray rank) profiles its Python calls from the moment the path reaches it: the driver from
`run_batch_job` (where the line becomes a request) until it returns, a rank from its first
step (`ds3dist/rank/column.py`) on, each with the calls on the stack at that moment; a rank's
heartbeat thread and module bodies run by imports are not counted. Printed: the files
per process role, their union with and without `ds3dist/model/` (the model's own modules),
and whether a rank called into the driver core (`ds3dist/core/` beyond its plain-data types).
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ds3dist"
DRIVER_ONLY = ("core/scheduler.py", "core/loop.py", "core/pages.py", "core/request.py")

# Installed in every process of the traced run (driver, Ray workers) through PYTHONPATH.
SITECUSTOMIZE = r'''
import os, sys, threading
_OUT, _PKG = os.environ["DS3DIST_TRACE_DIR"], os.environ["DS3DIST_TRACE_PKG"]
_TRIGGERS = {("jobs/batch.py", "run_batch_job"): "driver", ("rank/column.py", "run_column"): "rank"}
_QUIET = ("ds3dist-heartbeat",)  # threads beside the path
_seen, _state = set(), []  # _state: [role, the trigger's frame, still on]

def _note(path):
    if path not in _seen:
        _seen.add(path)
        with open(os.path.join(_OUT, f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{_state[0]} {path}\n")

def _profile(frame, event, arg):
    if event not in ("call", "return"):
        return
    path, name = frame.f_code.co_filename, frame.f_code.co_name
    if not path.startswith(_PKG) or name == "<module>":  # imports are not the path
        return
    rel = path[len(_PKG) + 1:]
    if not _state:
        role = _TRIGGERS.get((rel, name))
        if role is None or event != "call":
            return
        _state.extend([role, frame, True])
        f = frame.f_back
        while f is not None:
            if f.f_code.co_filename.startswith(_PKG):
                _note(f.f_code.co_filename[len(_PKG) + 1:])
            f = f.f_back
    if not _state[2] or threading.current_thread().name in _QUIET:
        return
    if event == "return":
        if frame is _state[1]:
            _state[2] = False  # the batch job is over: the shutdown after it is not the path
        return
    _note(rel)

sys.setprofile(_profile)
threading.setprofile(_profile)
'''


def traced_run(layout: str) -> None:
    """In the traced process: build the engine, then run the launch on one line."""
    from hydra import compose, initialize_config_module

    from ds3dist import launch
    from ds3dist.jobs import schema

    work = Path(os.environ["DS3DIST_TRACE_DIR"])
    inp = work / "one.jsonl"
    inp.write_text(json.dumps({"id": "one", "prompt": "The sea was calm that night"}) + "\n")
    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"+parallel={layout}", "job.progress=false", "execution.dtype=float32",
            "sampling.max_new_tokens=8", "sampling.temperature=0", f"job.input={inp}",
            f"job.output={work / 'out.jsonl'}"])
    r = schema.validate(cfg)
    engine = launch.make_engine(launch.resolve_checkpoint(r.source), r)
    launch.run(cfg, engine_factory=lambda checkpoint, resolved: engine)


def report(work: Path) -> None:
    roles: dict[str, set[str]] = {}
    for f in work.glob("*.txt"):
        for line in f.read_text().splitlines():
            role, path = line.split(" ", 1)
            roles.setdefault(role, set()).add(path)
    every = set().union(*roles.values()) if roles else set()
    for role in sorted(roles):
        print(f"{role} ({len(roles[role])} files): {', '.join(sorted(roles[role]))}")
    print(f"distinct files on the path: {len(every)}; without ds3dist/model/: "
          f"{sum(not p.startswith('model/') for p in every)}")
    back = sorted(p for p in roles.get("rank", ()) if p in DRIVER_ONLY)
    print(f"rank-side calls into the driver core: {', '.join(back) if back else 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="pp2ep2")
    ap.add_argument("--keep", type=Path, help="keep the per-process traces in this folder")
    ap.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.traced:
        traced_run(args.layout)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="ds3dist-trace-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, DS3DIST_TRACE_DIR=str(work), DS3DIST_TRACE_PKG=str(PKG),
               PYTHONPATH=os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])),
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    subprocess.run([sys.executable, __file__, "--traced", "--layout", args.layout], env=env,
                   check=True, timeout=900)
    report(work)


if __name__ == "__main__":
    main()
