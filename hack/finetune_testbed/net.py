"""Loopback ports: free ones for the processes a tool or a test starts, and whether one answers."""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_ports", "tcp_open"]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 a moment ago (all bound at once, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    return free_ports(1)[0]


def tcp_open(port: int, *, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
