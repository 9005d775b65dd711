"""Local models' threads run below the rest of Libra's priority, and so do the threads they
start (CTranslate2's and llama.cpp's own workers)."""

from __future__ import annotations

import os
import threading

import pytest

from libra.runtime.compute import compute_threads

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="POSIX priorities")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _nice_of_a_thread_it_starts() -> int:
    found: list[int] = []
    started = threading.Thread(target=lambda: found.append(_nice()))
    started.start()
    started.join()
    return found[0]


def test_model_threads_are_niced_and_so_are_the_threads_they_start() -> None:
    here = _nice()
    wanted = min(19, here + 7)
    with compute_threads(1, "test-model", nice=wanted) as pool:
        assert pool.submit(_nice).result() == wanted
        assert pool.submit(_nice_of_a_thread_it_starts).result() == wanted
        assert pool.submit(threading.current_thread).result().name.startswith("test-model")
    assert _nice() == here  # the caller's own thread is untouched
    with compute_threads(1, "test-plain", nice=0) as pool:
        assert pool.submit(_nice).result() == here


def test_a_model_thread_never_gets_a_higher_priority_than_the_process() -> None:
    here = _nice()
    with compute_threads(1, "test-model", nice=max(1, here - 1)) as pool:
        assert pool.submit(_nice).result() >= here
