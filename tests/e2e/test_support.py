"""The fixtures' own promises, where a flaky fixture would fail unrelated tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.redis import ExitedAtStart, RedisServer, free_port


def test_free_port_hands_out_no_port_twice() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_first_start_whose_ports_were_taken_moves_to_fresh_ones(tmp_path: Path) -> None:
    bus = free_port()
    server = RedisServer(tmp_path, args=("--cluster-enabled", "yes", "--cluster-port", str(bus)))
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))  # bound, not listening: connects are refused
        server.start()
        try:
            assert server.port != taken
            assert server.args[-1] != str(bus)
            with server.client() as client:
                assert client.ping()
        finally:
            server.kill()


def test_a_restart_keeps_its_port_and_fails_when_it_is_taken(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    port = server.port
    server.kill()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        with pytest.raises(ExitedAtStart):
            server.start()
    assert server.port == port
    server.start()
    try:
        with server.client() as client:
            assert client.ping()
    finally:
        server.kill()
