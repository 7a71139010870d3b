"""Rendezvous helpers: interface of an address, socket interface variables, free ports."""

import socket

import pytest

from ds3dist.runtime import rendezvous


def test_loopback_interface_found():
    assert rendezvous.interface_for_ip("127.0.0.1") == "lo"
    assert rendezvous.interface_for_ip("203.0.113.77") is None


def test_ifname_set_unless_user_chose(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    done = rendezvous.set_socket_ifname("127.0.0.1")
    assert done == {"GLOO_SOCKET_IFNAME": "lo"}
    import os
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_free_port_and_busy_preferred_port():
    port = rendezvous.free_port("127.0.0.1")
    assert rendezvous.free_port("127.0.0.1", port) == port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="rendezvous_port"):
            rendezvous.free_port("127.0.0.1", busy)
