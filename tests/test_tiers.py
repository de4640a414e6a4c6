"""The tier guard of tests/conftest.py: an unmarked test that starts a process or a server fails at
that call, naming itself and the fix (so the fast tier stays in-process by construction)."""
from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys

import pytest

import conftest


def test_an_unmarked_test_cannot_start_a_process_or_a_server(request):
    fix = "mark it @pytest.mark.integration"
    with pytest.raises(conftest.TierViolation, match=f"{request.node.nodeid} starts a subprocess .*{fix}"):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(conftest.TierViolation, match="spawns a process"):  # no audit event of its own
        multiprocessing.get_context("spawn").Process(target=print).start()
    with socket.socket() as s, pytest.raises(conftest.TierViolation, match="binds a socket"):
        s.bind(("127.0.0.1", 0))
    assert len(conftest._Guard.violations) == 3
    conftest._Guard.violations.clear()  # provoked on purpose: the guard must not fail this test for them


@pytest.mark.integration
def test_an_integration_test_may():
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
