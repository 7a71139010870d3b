"""Rendezvous without guesswork: the address Ray knows for a node, its interface, a free port.

Multi-node gloo/NCCL jobs fail when each process guesses its own address (hostname lookups
give 127.0.1.1, containers expose several interfaces). Each rank uses the IP that Ray reports
for its node, and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the interface holding that IP,
unless the user set them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

_SIOCGIFADDR = 0x8915


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each network interface that has one (Linux)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)
            except OSError:
                continue
            out[name] = socket.inet_ntoa(res[20:24])
    return out


def interface_for_ip(ip: str) -> str | None:
    for name, addr in interface_addresses().items():
        if addr == ip:
            return name
    return None


def set_socket_ifname(ip: str) -> dict[str, str]:
    """Point gloo and NCCL at the interface that holds `ip`, unless the user chose one.

    Returns the variables this call set."""
    name = interface_for_ip(ip)
    done = {}
    if name is None:
        return done
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var not in os.environ:
            os.environ[var] = name
            done[var] = name
    return done


def free_port(ip: str, preferred: int | None = None) -> int:
    """A TCP port free on `ip`: `preferred` if it can be bound, else one the OS picks."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind((ip, preferred))
                return preferred
            except OSError as e:
                raise RuntimeError(
                    f"runtime.rendezvous_port: port {preferred} is not free on {ip} ({e})"
                ) from None
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]
