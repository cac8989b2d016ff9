"""The built wheel carries everything the installed package reads at run time, and its version is `__version__`.

The wheel is built from a copy of the sources in a temporary folder, so the test neither writes `build/` into the
checkout nor races an editable install running beside it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_softmix"
# What setuptools needs to build: the project table, the readme it names, and the package itself.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache", ".pytest_cache")

pytestmark = pytest.mark.slow


def _source_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', (PACKAGE / "__init__.py").read_text(encoding="utf-8"), re.M)
    assert match, 'peft_softmix/__init__.py must define __version__ = "X.Y.Z" (setuptools reads it from there)'
    return match.group(1)


def _source_files(folder: Path) -> set[str]:
    """Files under ``folder`` as wheel paths (``peft_softmix/...``), without caches."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "peft_softmix", ignore=JUNK)
    out = tmp_path_factory.mktemp("dist")
    # No isolation and no index: setuptools comes from the test environment ([test] extra), nothing is downloaded.
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    result = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    wheels = list(out.glob("peft_softmix-*.whl"))
    assert len(wheels) == 1, f"expected one peft_softmix wheel in {out}, found {[p.name for p in out.iterdir()]}"
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_ships_the_metric_script(names: set[str]) -> None:
    # fact_retrieval/ has no __init__.py (evaluate loads the script by path), so only package-data brings it along
    assert "peft_softmix/metrics/__init__.py" in names
    assert "peft_softmix/metrics/fact_retrieval/fact_retrieval.py" in names


def test_wheel_ships_the_sample_data(names: set[str]) -> None:
    sample = PACKAGE / "data" / "sample"
    expected = _source_files(sample)
    assert expected, f"{sample} holds no files; facts.SAMPLE_DIR and the examples read the shipped sample from there"
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks sample data files: {missing[:10]}"


def test_wheel_ships_py_typed(names: set[str]) -> None:
    assert "peft_softmix/py.typed" in names


def test_wheel_ships_every_package_file(names: set[str]) -> None:
    # a new sub-folder without __init__.py, or a new data suffix, would otherwise be dropped silently
    missing = sorted(_source_files(PACKAGE) - names)
    assert not missing, f"files in peft_softmix/ that the wheel lacks: {missing[:10]}"


def test_wheel_holds_only_the_package(names: set[str], wheel: Path) -> None:
    version = _source_version()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"peft_softmix", f"peft_softmix-{version}.dist-info"}, f"unexpected top-level entries: {top}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_version_is_the_package_version(names: set[str], wheel: Path) -> None:
    version = _source_version()
    assert wheel.name.startswith(f"peft_softmix-{version}-"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(archive.read(f"peft_softmix-{version}.dist-info/METADATA").decode("utf-8"))
    assert metadata["Name"] == "peft-softmix"
    assert metadata["Version"] == version
    # the registration code uses PEFT internals, so the wheel must keep the upper bound on PEFT
    peft = [r for r in metadata.get_all("Requires-Dist") or [] if re.match(r"peft\s*[<>=!~]", r)]
    assert len(peft) == 1 and "<" in peft[0], peft


def test_wheel_installs_the_command_line(wheel: Path) -> None:
    version = _source_version()
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(f"peft_softmix-{version}.dist-info/entry_points.txt").decode("utf-8")
    assert re.search(r"^\[console_scripts\]\s*^peft-softmix = peft_softmix\.cli:main$", entry_points, re.M), (
        entry_points
    )
