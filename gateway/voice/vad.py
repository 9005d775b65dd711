"""Silero VAD: the probability that a 20 ms frame of 16 kHz audio is speech.

The model is the ONNX file that ships inside faster-whisper (``faster_whisper/assets``), run
with onnxruntime directly. It reads 512 new samples (32 ms) plus 64 of context and carries an
LSTM state from one window to the next. Libra calls it every 20 ms, on the newest 512 samples:
windows overlap, but a decision is ready at each frame instead of every 32 ms, which is
up to 12 ms sooner at the end of a turn (the peer measured in issue 6 lost most of its own time
to 32 ms windows). One call costs about 0.1 ms of one core.

Digital silence (what Discord's gaps are filled with) is not worth a call: a frame whose every
sample is within ``_QUIET`` of zero scores 0 without running the model, and after half a second
of them the recurrent state starts afresh, as it would for a new stream.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime

__all__ = ["FRAME_SAMPLES", "SAMPLE_RATE", "SileroVad", "silero_model_path"]

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz
_WINDOW = 512
_CONTEXT = 64
_QUIET = 32  # about -60 dBFS: no microphone is this quiet while someone talks
_FORGET_AFTER = 25  # quiet frames (500 ms) after which the state is reset


def silero_model_path() -> Path:
    """Returns the path of the Silero VAD model that faster-whisper ships."""
    from faster_whisper.utils import get_assets_path

    return Path(get_assets_path()) / "silero_vad_v6.onnx"


@functools.cache
def _session() -> onnxruntime.InferenceSession:
    # One session per process, shared by every speaker: a session's run() is thread-safe and
    # the recurrent state lives in each SileroVad, not in the session.
    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4
    return onnxruntime.InferenceSession(
        str(silero_model_path()), providers=["CPUExecutionProvider"], sess_options=options
    )


class SileroVad:
    """Speech probability per 20 ms frame of one audio stream (keeps that stream's state)."""

    def __init__(self) -> None:
        self.session = _session()
        self.reset()

    def reset(self) -> None:
        """Forgets the stream: a new speaker, or a gap in the audio."""
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._window = np.zeros((1, _WINDOW + _CONTEXT), np.float32)
        self._quiet = 0

    def __call__(self, frame: np.ndarray) -> float:
        """Returns the probability (0 to 1) that ``frame`` (320 int16 samples) is speech."""
        window = self._window
        window[0, :-FRAME_SAMPLES] = window[0, FRAME_SAMPLES:]
        window[0, -FRAME_SAMPLES:] = frame * (1.0 / 32768.0)
        if frame.min() > -_QUIET and frame.max() < _QUIET:  # (abs() of -32768 overflows)
            self._quiet += 1
            if self._quiet == _FORGET_AFTER:
                self._h[:] = 0.0
                self._c[:] = 0.0
            return 0.0
        self._quiet = 0
        prob, self._h, self._c = self.session.run(
            None, {"input": window, "h": self._h, "c": self._c}
        )
        return float(prob[0])
