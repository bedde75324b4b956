"""Shared test fixtures: golden reference files, seeding, and a guard against network access."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"


def load_reference(name: str) -> dict:
    """Load a golden fixture recorded from the reference implementation (see fixtures/reference/README.md)."""
    return torch.load(REFERENCE / name, weights_only=True)


@pytest.fixture
def reference():
    return load_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail loudly if any test tries to reach a non-local host (nothing may download at run time)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1", "0.0.0.0")
                                          or host.startswith("/")):
            raise RuntimeError(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


@pytest.fixture(autouse=True)
def _glibc_defaults_in_this_process(monkeypatch):
    """The pytest process keeps glibc's malloc defaults: `runtime.tune_cpu_allocator` (called by in-process
    benchmark and training code) turns off mmap and heap trimming for good, right for one training run and
    wrong for a suite that builds hundreds of differently sized models in one process. Subprocesses (the
    launcher tests, tests/test_runtime.py's page-fault test) are fresh interpreters and tune for real."""
    from segearthr1 import runtime

    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    yield
