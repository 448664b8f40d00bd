"""Where labkit keeps what it measured: one function, used by labkit.results (rows, checked values) and
labkit.reuse (measurements reused across lessons)."""

from __future__ import annotations

import os
from pathlib import Path


def results_dir() -> Path:
    """$LABKIT_RESULTS_DIR; else, on Colab with Google Drive mounted, <Drive>/labkit/results (kept across
    sessions: labkit.colab); else ~/.cache/labkit/results."""
    if os.environ.get("LABKIT_RESULTS_DIR"):
        return Path(os.environ["LABKIT_RESULTS_DIR"])
    from .colab import drive_folder  # here, not at the top: `python -m labkit.colab` imports labkit first

    drive = drive_folder()
    return drive / "results" if drive is not None else Path.home() / ".cache" / "labkit" / "results"


__all__ = ["results_dir"]
