"""Worker threads for local models, at a lower CPU priority than the rest of Libra.

A local model (faster-whisper, the embedded SmolLM2) keeps a core busy for hundreds of
milliseconds at a time. On a small machine the event loops that carry everyone else's turns
would queue behind it, and a text turn would wait on a voice turn's transcription. So the
models run on threads with a higher nice value (``LOCAL_MODEL_NICE``, 10 by default): the
kernel still gives them every idle cycle, but a turn's few milliseconds of work come first.

On Linux a nice value belongs to a thread and is inherited by the threads it starts, so the
libraries' own workers (CTranslate2's, llama.cpp's) started from these threads inherit it too.
Elsewhere, or with 0, the threads run as the rest.

The same holds for whole processes whose work nobody waits on (the projections, memory: read
models that may lag a few milliseconds): :func:`lower_priority` at start, before any thread.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["compute_threads", "lower_priority"]

log = logging.getLogger("libra.compute")


def compute_threads(workers: int, name: str, *, nice: int = 0) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads named ``name-*`` whose priority is lowered to ``nice``."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_priority, initargs=(nice,)
    )


def lower_priority(nice: int) -> None:
    """Raises the calling thread's nice value to ``nice`` (the threads it starts inherit it)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:  # never raise it: a process started at a higher nice keeps that
        os.setpriority(os.PRIO_PROCESS, thread, max(nice, os.getpriority(os.PRIO_PROCESS, thread)))
    except OSError as exc:
        log.warning("could not lower the priority of a thread: %s", exc)
