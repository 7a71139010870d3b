"""Joining or starting the Ray cluster, within a bounded time.

`ray_address(configured)` says which address is in use and where it came from
(`runtime.address`, else `$RAY_ADDRESS`, else none: a new local cluster). `check_address`
connects to its host:port within the timeout, so a wrong address fails in seconds with a
message naming it and its source, not after minutes of Ray's retries. `connect` does that
check, then `ray.init` (bounded too when joining an existing cluster).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Any, Callable

import ray
from ray.experimental import internal_kv

log = logging.getLogger(__name__)

RAY_CLIENT_PORT = 10001
RAY_GCS_PORT = 6379


class ClusterError(ConnectionError):
    """The Ray cluster cannot be reached; the message names the address and its source."""


def ray_address(configured: str | None) -> tuple[str | None, str]:
    """(address, where it came from): runtime.address, else $RAY_ADDRESS, else (None, "")."""
    if configured:
        return configured, "runtime.address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "$RAY_ADDRESS") if env else (None, "")


def check_address(address: str | None, source: str, timeout_s: float) -> None:
    """Open a TCP connection to the address's host:port within timeout_s ('auto' and 'local'
    are left to `connect`, which bounds them by the same timeout)."""
    if not address or address in ("auto", "local"):
        return
    host, port = _host_port(address, source)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ClusterError(
            f"{source}: cannot reach the Ray cluster at {address} within "
            f"runtime.connect_timeout_s={timeout_s:g} s ({why}); start it, fix the address, "
            f"or unset it to start a local cluster") from None


def _host_port(address: str, source: str) -> tuple[str, int]:
    addr, default = address, RAY_GCS_PORT
    if "://" in addr:
        scheme, addr = addr.split("://", 1)
        default = RAY_CLIENT_PORT if scheme == "ray" else RAY_GCS_PORT
    addr = addr.rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep or "]" in port:
        return addr.strip("[]"), default
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ClusterError(f"{source}: {address!r} is not host:port") from None


@contextmanager
def _handlers_kept():
    """Around ray.init in the main thread: SIGTERM/SIGINT held back (a signal arriving meanwhile
    is delivered after it) and the caller's handlers put back over the ones Ray installs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in sigs}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def connect(configured: str | None, num_cpus: int, timeout_s: float) -> None:
    """Join the cluster at runtime.address / $RAY_ADDRESS, or start a local one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address, source = ray_address(configured)
    if not address:
        # Ray starts workers at nice 15; here the workers are the computation, not background
        os.environ.setdefault("RAY_worker_niceness", "0")
        with _handlers_kept():
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        return
    check_address(address, source, timeout_s)
    errors: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, log_to_driver=True)
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)

    t = threading.Thread(target=join, name="ray-connect", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ClusterError(f"{source}: {address} accepts connections but Ray did not connect "
                           f"within runtime.connect_timeout_s={timeout_s:g} s; is it a Ray "
                           f"cluster of the same version?")
    if errors:
        raise ClusterError(f"{source}: cannot join the Ray cluster at {address}: "
                           f"{type(errors[0]).__name__}: {errors[0]}") from errors[0]


def call_within(fn: Callable[[], Any], timeout_s: float, what: str, default: Any = None) -> Any:
    """fn() run in a daemon thread for at most timeout_s (a call to a cluster that may be
    gone); `default`, logged, when it did not finish or raised."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=call, name=what, daemon=True)
    t.start()
    t.join(timeout_s)
    if result:
        return result[0]
    why = f"no answer within {timeout_s:g} s" if t.is_alive() else repr(errors[0])
    log.warning("%s: %s (the cluster may be gone)", what, why)
    return default


def alive(timeout_s: float = 1.0) -> bool:
    """Whether the cluster this process joined still answers (its control store, within
    timeout_s); True when none was joined."""
    if not ray.is_initialized():
        return True
    try:
        internal_kv.global_gcs_client.internal_kv_get(b"alive", b"ds3dist", timeout=timeout_s)
    except Exception:  # no answer: the head is gone
        return False
    return True
