"""environment.yml and pyproject.toml list the same dependencies (no conda solver runs offline,
so: parse the YAML, check every spec's syntax, and let pip resolve its pip section)."""

import subprocess
import sys
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += [s for s in extra if s not in specs]
    return specs


def environment_pip_section():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] and "pip" in env["dependencies"]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return [s for s in pip if not s.startswith("-e")]


def test_environment_lists_the_same_dependencies_as_pyproject():
    canon = lambda specs: {Requirement(s).name.lower(): Requirement(s).specifier for s in specs}
    assert canon(environment_pip_section()) == canon(pyproject_requirements())


def test_torch_is_not_pinned_tightly():
    (torch_spec,) = [Requirement(s) for s in pyproject_requirements() if Requirement(s).name == "torch"]
    assert "==" not in str(torch_spec.specifier)  # Colab's preinstalled CUDA torch must satisfy it


def test_pip_can_resolve_the_environment(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(environment_pip_section()))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "-r", str(reqs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
