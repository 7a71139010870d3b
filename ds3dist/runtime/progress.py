"""Each rank's progress, reported where the driver can read it even when the rank cannot
answer a call (stopped, hung, or busy in a compiled graph).

A rank publishes `{"step", "entered", "last", "time", "error"}` under its key in Ray's
key-value store (one small write every `HEARTBEAT_S` seconds from a daemon thread, and one when
a step fails). After a failure the engine reads every rank's entry and says who is behind: a
rank whose heartbeat stopped (its process is stopped or gone), a rank that entered fewer
collectives than its stage's peers, or the error a rank reported.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

from ray.experimental import internal_kv

HEARTBEAT_S = 2.0
NAMESPACE = "ds3dist"
KV_TIMEOUT_S = 2.0  # a read or delete the store does not answer in this time gives up


def key(engine_id: str, rank: int) -> str:
    return f"progress/{engine_id}/{rank}"


def publish(engine_id: str, rank: int, state: dict) -> None:
    internal_kv._internal_kv_put(key(engine_id, rank), json.dumps({**state, "time": time.time()}),
                                 overwrite=True, namespace=NAMESPACE)


def start_heartbeat(engine_id: str, rank: int, state: Callable[[], dict]) -> threading.Thread:
    def beat() -> None:
        while True:
            try:
                publish(engine_id, rank, state())
            except Exception:  # the store is gone: the cluster is shutting down
                return
            time.sleep(HEARTBEAT_S)

    t = threading.Thread(target=beat, name="ds3dist-heartbeat", daemon=True)
    t.start()
    return t


def read(engine_id: str, ranks: int, timeout_s: float = KV_TIMEOUT_S) -> dict[int, dict | None]:
    """Every rank's entry (None: none published); {} when the store does not answer within
    timeout_s (the cluster is going down)."""
    out: dict[int, dict | None] = {}
    try:
        for r in range(ranks):
            raw = internal_kv.global_gcs_client.internal_kv_get(
                key(engine_id, r).encode(), NAMESPACE.encode(), timeout=timeout_s)
            out[r] = json.loads(raw) if raw else None
    except Exception:  # no answer: nothing is known of the ranks' progress
        return {}
    return out


def clear(engine_id: str, ranks: int, timeout_s: float = KV_TIMEOUT_S) -> None:
    for r in range(ranks):
        internal_kv.global_gcs_client.internal_kv_del(
            key(engine_id, r).encode(), False, NAMESPACE.encode(), timeout=timeout_s)


def behind(progress: dict[int, dict | None], stage_of: Callable[[int], int],
           now: float | None = None) -> dict[int, str]:
    """rank -> why it is behind or failed, from the published progress."""
    now = time.time() if now is None else now
    if all(p is None for p in progress.values()):  # nothing published yet (start-up)
        return {}
    top: dict[int, int] = {}
    for r, p in progress.items():
        if p is not None:
            top[stage_of(r)] = max(top.get(stage_of(r), 0), p["entered"])
    out: dict[int, str] = {}
    for r, p in progress.items():
        if p is None:
            out[r] = "never reported progress"
        elif p.get("error"):
            out[r] = p["error"]
        elif now - p["time"] > 2 * HEARTBEAT_S + 1:
            out[r] = (f"stopped or hung: last heard {now - p['time']:.0f} s ago, in step "
                      f"{p['step']} after collective #{p['entered']} ({p['last'] or 'none'})")
        elif p["entered"] < top[stage_of(r)]:
            out[r] = (f"behind its stage: at collective #{p['entered']} ({p['last']}) in step "
                      f"{p['step']}, its peers reached #{top[stage_of(r)]}")
    return out
