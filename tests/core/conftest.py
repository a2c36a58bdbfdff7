"""Fixtures shared by the core tests."""
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection fails loudly and is recorded; Hugging Face libraries are told to stay offline."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts
