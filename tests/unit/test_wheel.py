"""The wheel a user installs holds every module and every preset, and `base: [gpt2-tiny]` resolves
from it with no checkout around (built for real with `pip wheel --no-deps`, in a copy of the sources
so the build's scratch folders never land in the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pipeline", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("*.whl")
    return found


def test_the_wheel_holds_every_module_and_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    presets = {"pipeline/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert modules - names == set(), "modules missing from the wheel"
    assert presets - names == set(), "presets missing from the wheel"
    assert "pipeline/configs/models/gpt2-tiny.yaml" in names and "pipeline/configs/demo.yaml" in names


def test_presets_by_name_resolve_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    far = tmp_path / "exp"
    far.mkdir()
    (far / "my.yaml").write_text("base: [gpt2-tiny]\ntrain: {max_steps: 7}\n")
    code = ("import sys; from pipeline.config import PRESETS_DIR, load_config, preset_files; "
            "cfg = load_config(sys.argv[1]); "
            "print(PRESETS_DIR, len(preset_files()), cfg.model.n_layer, cfg.train.max_steps)")
    proc = subprocess.run([sys.executable, "-c", code, str(far / "my.yaml")], cwd=far, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, count, _layers, steps = proc.stdout.split()
    assert Path(where) == site / "pipeline" / "configs"  # the wheel's copy, not this checkout's
    assert int(count) == len(list((ROOT / "configs").rglob("*.yaml"))) and steps == "7"
