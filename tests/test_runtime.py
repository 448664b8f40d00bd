"""The runtime each lesson declares (labkit.runtime), its start-up check, the Colab set-up cell
(labkit.colab) and where results live on Colab; every notebook is checked against them."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import types
import warnings
from importlib.metadata import version
from pathlib import Path

import nbformat
import pytest
import tomllib
import torch

from labkit import colab, profiles, results, runtime
from labkit.course import lesson_id, lessons
from labkit.rehearsal import RUNTIMES, fits, plans, rehearse

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = lessons(ROOT / "notebooks")
ORDER = list(RUNTIMES)  # smallest first: T4, L4, A100-40, A100-80


def gpu(name: str, runtime_key: str, sm: int | None = None, host: int | None = None):
    """Device properties and RAM like those of RUNTIMES[runtime_key], as torch and psutil report them."""
    rt = RUNTIMES[runtime_key]
    sm = rt.sm if sm is None else sm
    props = types.SimpleNamespace(name=name, total_memory=rt.gpu_bytes, major=sm // 10, minor=sm % 10)
    return props, types.SimpleNamespace(total=rt.host_bytes if host is None else host)


@pytest.fixture
def machine_like(monkeypatch):
    """machine_like(props, ram): this process sees that GPU and that much CPU RAM."""
    import psutil

    def use(props, ram):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)
        monkeypatch.setattr(psutil, "virtual_memory", lambda: ram)

    return use


# --- the table -----------------------------------------------------------------------------------------


def test_every_lesson_declares_a_known_runtime():
    assert list(runtime.LESSONS) == [lesson_id(p) for p in NOTEBOOKS]
    for key, need in runtime.LESSONS.items():
        assert need.runtime in RUNTIMES, key
        assert need.basis in ("rehearsed", "estimate"), key
        assert need.why and "\n" not in need.why, key
        assert need.min_sm <= RUNTIMES[need.runtime].sm, f"{key}: its runtime lacks the compute capability it needs"


# The plans of labkit.rehearsal behind each "rehearsed" line, as `python -m labkit.rehearsal` runs them.
# Lessons 07 and 09-12: tests/test_rehearsal_lessons_b.py (labkit.rehearsal.serving_and_training.PLANS).
REHEARSED = {
    "00": lambda r: plans.lesson00(r, windows=2, new_tokens=2),
}


def test_every_rehearsed_lesson_has_a_plan():
    """Lessons 01-06 and 08 are checked by tests/test_rehearsal_lessons.py (labkit.rehearsal.compression), 07 and
    09-12 by tests/test_rehearsal_lessons_b.py (labkit.rehearsal.serving_and_training), the others here."""
    from labkit.rehearsal import compression, serving_and_training

    rehearsed = {k for k, n in runtime.LESSONS.items() if n.basis == "rehearsed"}
    assert rehearsed <= set(REHEARSED) | set(compression.PLANS) | set(serving_and_training.PLANS)


@pytest.mark.parametrize("key", sorted(REHEARSED))
def test_a_rehearsed_lesson_fits_its_runtime_and_not_the_one_below(key):
    report = rehearse(REHEARSED[key], key)
    declared = runtime.LESSONS[key].runtime
    assert fits(report, declared).ok, fits(report, declared).why
    below = ORDER[: ORDER.index(declared)]
    assert below, f"lesson {key} is rehearsed on the smallest runtime: nothing to compare"
    assert not fits(report, below[-1]).ok, f"lesson {key} fits {below[-1]}: declare that one"


def test_lesson_keys():
    assert runtime.lesson_key(0) == runtime.lesson_key("0") == runtime.lesson_key("00_baseline") == "00"
    assert runtime.lesson_key(12) == "12"
    for bad in (13, "13", "ab", "", "1_x", -1):
        with pytest.raises(ValueError, match="allowed are"):
            runtime.lesson_key(bad)


# --- the start-up check --------------------------------------------------------------------------------


def test_require_on_the_cpu_profile_prints_the_protocol_and_looks_at_nothing(monkeypatch, capsys):
    def no_gpu(device=0):
        raise AssertionError("the CPU profile must not ask for a GPU")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    monkeypatch.setenv("LABKIT_DATA_DIR", "/some/folder")
    P = profiles.PROFILES["cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in runtime.LESSONS:
            assert runtime.require(key, P) is None
    banner = runtime.protocol_banner(P)
    assert capsys.readouterr() == ((banner + "\n") * len(runtime.LESSONS), "")
    main, sweep = banner.split("\n")
    assert main == P.protocol().describe() and main.startswith(f"protocol {P.protocol().fingerprint}: ")
    assert "(local copy)" in main and "/some/folder" not in banner  # the copy's kind, never a machine's path
    assert sweep == f"curves and sweeps: protocol {P.protocol('sweep').fingerprint} (the same, on the first 8 windows)"


def test_require_refuses_a_t4_for_an_a100_lesson_and_names_the_runtime(machine_like):
    machine_like(*gpu("Tesla T4", "T4"))
    with pytest.raises(RuntimeError) as err:
        runtime.require("03", profiles.PROFILES["gpu"])
    message = str(err.value)
    assert "Lesson 03" in message and "Tesla T4" in message and "GPU memory 14.8 GiB < 39.4 GiB" in message
    assert "Runtime > Change runtime type > A100 GPU" in message and "PROFILE = 'cpu'" in message


def test_require_says_when_colab_has_no_gpu_large_enough(machine_like, monkeypatch):
    # a lesson declared on the 80 GB A100 (none may be today: the declaration is set here)
    monkeypatch.setitem(runtime.LESSONS, "12", runtime.Need("A100-80", "estimate", "two 7B models and a walk"))
    machine_like(*gpu("NVIDIA A100-SXM4-40GB", "A100-40"))
    with pytest.raises(RuntimeError, match="Colab's runtime menu has no GPU this large"):
        runtime.require("12", profiles.PROFILES["gpu"])


def test_require_passes_a_sufficient_machine_with_nothing_but_the_protocol(machine_like, capsys):
    machine_like(*gpu("NVIDIA A100-SXM4-80GB", "A100-80"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in runtime.LESSONS:
            have = runtime.require(key, profiles.PROFILES["gpu"])
            assert have.gpu == "NVIDIA A100-SXM4-80GB" and have.sm == 80
    banner = runtime.protocol_banner(profiles.PROFILES["gpu"])
    assert capsys.readouterr() == ((banner + "\n") * len(runtime.LESSONS), "")
    assert "all windows of 2048 tokens" in banner and "first 40 windows" in banner


def test_require_accepts_each_lesson_on_its_declared_runtime(machine_like):
    for key, need in runtime.LESSONS.items():
        machine_like(*gpu("declared", need.runtime))
        assert runtime.require(key, profiles.PROFILES["gpu"]).gpu == "declared"


def test_require_checks_compute_capability(machine_like):
    machine_like(*gpu("an sm75 card with 80 GB", "A100-80", sm=75))
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5 < 8\.0"):
        runtime.require("02", profiles.PROFILES["gpu"])  # the 2:4 sparse kernels


def test_require_only_warns_about_cpu_ram(machine_like):
    machine_like(*gpu("NVIDIA L4", "L4", host=16 * 2**30))
    with pytest.warns(UserWarning, match=r"CPU RAM 16\.0 GiB < 53\.0 GiB.*Change runtime type > L4 GPU"):
        assert runtime.require("00", profiles.PROFILES["gpu"]).gpu == "NVIDIA L4"


def test_require_rejects_an_unknown_lesson():
    with pytest.raises(ValueError, match="lesson=99"):
        runtime.require(99, profiles.PROFILES["cpu"])


# --- the notebooks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: lesson_id(p))
def test_notebook_declares_and_checks_its_runtime(path):
    nb = nbformat.read(path, as_version=4)
    key = lesson_id(path)
    need = runtime.LESSONS[key]
    assert nb.metadata["labkit"] == {"runtime": need.runtime}
    assert nb.metadata["accelerator"] == "GPU"
    assert nb.metadata["colab"]["gpuType"] == runtime.colab_gpu_type(key) in ("T4", "L4", "A100")
    assert runtime.first_cell_line(key) in nb.cells[0].source.split("\n")
    assert RUNTIMES[need.runtime].name in runtime.first_cell_line(key)
    setup = nb.cells[1]
    assert setup.cell_type == "code" and setup.source == colab.SETUP_CELL and not setup.outputs
    code = runtime.profile_cell(nb, key).source.split("\n")
    assert code[code.index(runtime.PROFILE_LINE) + 1] == runtime.require_line(key)
    assert f'runtime.require("{key}", P)' in runtime.require_line(key)
    assert any(re.match(r"from labkit import .*\bruntime\b", line) for line in code)
    assert not runtime.sync_notebook(nb, key), "out of step: run `python -m labkit.runtime`"


def test_sync_notebook_fixes_an_old_notebook_and_keeps_outputs():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    outputs = [c.get("outputs") for c in nb.cells]
    nb.cells[1].source = "# Set-up. an older version"
    nb.cells[0].source = nb.cells[0].source.replace(runtime.first_cell_line("00"), "**Runtime (GPU profile):** old")
    del nb.metadata["labkit"]
    assert runtime.sync_notebook(nb, "00")
    assert nb.cells[0].source == nbformat.read(NOTEBOOKS[0], as_version=4).cells[0].source  # no doubled line
    assert nb.cells[1].source == colab.SETUP_CELL and nb.metadata["labkit"]["runtime"] == "L4"
    assert [c.get("outputs") for c in nb.cells] == outputs
    assert not runtime.sync_notebook(nb, "00")


def test_readme_shows_the_runtime_table():
    readme = (ROOT / "README.md").read_text()
    assert runtime.markdown_table() in readme
    assert runtime.sync_readme(readme) == readme
    stale = readme.replace(runtime.markdown_table(), runtime.markdown_table().replace("Colab L4", "Colab T4"))
    assert stale != readme and runtime.sync_readme(stale) == readme
    with pytest.raises(ValueError, match="exactly one runtime table"):
        runtime.sync_readme("no table here")


# --- the set-up cell -----------------------------------------------------------------------------------


def test_setup_cell_installs_the_pinned_release():
    version_ = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"v{version_}" == colab.COURSE_REF, "bump COURSE_REF with pyproject's version (and tag the release)"
    assert f'"labkit @ git+{colab.COURSE_REPO}@{colab.COURSE_REF}"' in colab.SETUP_CELL
    assert colab.SETUP_CELL.count("git+") == 1  # one source of the course
    assert all(len(line) <= 120 for line in colab.SETUP_CELL.split("\n"))


def test_setup_cell_does_nothing_and_prints_nothing_off_colab(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("installed something off Colab"))
    namespace = {}
    exec(colab.SETUP_CELL, namespace)
    assert namespace["PROFILE"] == "gpu"
    assert capsys.readouterr() == ("", "")


def test_setup_cell_on_colab_holds_torch_and_triton(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda args, check: calls.append(args))
    monkeypatch.setattr(colab, "setup", lambda profile: calls.append(("setup", profile)))
    exec(colab.SETUP_CELL, {})
    course, held = calls[0][5], calls[0][6:]
    assert course == f"labkit @ git+{colab.COURSE_REPO}@{colab.COURSE_REF}"
    assert held[0] == f"torch=={version('torch')}"
    assert calls[-1] == ("setup", "gpu")


def test_pip_keeps_an_installed_torch_that_satisfies_labkit(tmp_path):
    """What the set-up cell relies on, with this machine's torch and triton standing in for Colab's: pip
    would install labkit alone (offline: --no-index, so any other package would fail to resolve)."""
    held = [f"{name}=={version(name)}" for name in ("torch", "triton")]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", str(ROOT), *held],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (would,) = [line for line in done.stdout.splitlines() if line.startswith("Would install")]
    assert would.split() == ["Would", "install", f"labkit-{version('labkit')}"]


# --- Colab: profile, Google Drive, Hub login -----------------------------------------------------------


@pytest.fixture
def on_colab(monkeypatch, tmp_path):
    """A Colab session whose Google Drive is mounted under tmp_path (call mount() to mount it)."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(colab, "DRIVE_ROOT", tmp_path / "drive" / "MyDrive")
    for name in ("LABKIT_RESULTS_DIR", "HF_HOME", "LABKIT_PROFILE", "HF_TOKEN"):
        monkeypatch.setenv(name, "")  # recorded, so what setup() sets is undone after the test
        monkeypatch.delenv(name)
    return lambda: colab.DRIVE_ROOT.mkdir(parents=True)


def test_results_default_to_drive_on_colab_when_mounted(on_colab, monkeypatch, tmp_path):
    home = Path.home() / ".cache" / "labkit" / "results"
    assert results.results_dir() == home  # Colab, Drive not mounted
    on_colab()
    assert results.results_dir() == tmp_path / "drive" / "MyDrive" / "labkit" / "results"
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "mine"))
    assert results.results_dir() == tmp_path / "mine"  # the user's choice wins
    monkeypatch.delenv("LABKIT_RESULTS_DIR")
    monkeypatch.delitem(sys.modules, "google.colab")
    assert results.results_dir() == home  # a mounted-looking folder off Colab changes nothing


def test_setup_on_colab_with_drive(on_colab, monkeypatch, capsys):
    import os

    on_colab()
    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)
    colab.setup("gpu")
    assert os.environ["LABKIT_PROFILE"] == "gpu"
    assert os.environ["HF_HOME"] == str(colab.DRIVE_ROOT / "labkit" / "huggingface")
    assert "Results:" in capsys.readouterr().out
    monkeypatch.setenv("HF_HOME", "/mine")
    colab.setup("cpu")
    assert os.environ["HF_HOME"] == "/mine" and os.environ["LABKIT_PROFILE"] == "cpu"


def test_setup_on_colab_without_drive_says_how_to_keep_results(on_colab, capsys):
    import os

    colab.setup("gpu")
    assert "HF_HOME" not in os.environ
    assert "drive.mount('/content/drive')" in capsys.readouterr().out


def test_setup_off_colab_changes_nothing(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setenv("LABKIT_PROFILE", "")
    monkeypatch.delenv("LABKIT_PROFILE")
    colab.setup("gpu")
    import os

    assert "LABKIT_PROFILE" not in os.environ and capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="allowed are"):
        colab.setup("tpu")


def test_hub_login_only_for_a_gated_model_without_a_token(monkeypatch):
    import huggingface_hub

    logins = []
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda: logins.append(1))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    colab.login_if_gated("llama-7b")  # huggyllama/llama-7b is not gated
    assert logins == []
    colab.login_if_gated("llama-2-7b")
    assert logins == [1]
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    colab.login_if_gated("llama-2-7b")
    assert logins == [1]


def test_protocol_banner_names_the_sweeps_only_when_they_differ():
    P = profiles.PROFILES["cpu"]
    same = dataclasses.replace(P, sweep_windows=P.eval_windows)
    assert runtime.protocol_banner(same) == same.protocol().describe()
    assert runtime.protocol_banner(P).count("\n") == 1
