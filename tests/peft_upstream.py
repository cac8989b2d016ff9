"""PEFT's own common test suite (`PeftCommonTester`), taken from the sdist of the installed PEFT, never copied here.

PEFT ships its tests in its source distribution only. `find_tests_dir()` finds them, in this order:

1. ``PEFT_TESTS_DIR``: the unpacked sdist's ``tests/`` folder (or the sdist folder that holds it);
2. the cache, ``$XDG_CACHE_HOME/peft_softmix/peft-<version>/tests`` (``~/.cache/...`` by default), which
   ``python tests/peft_upstream.py fetch`` fills: ``pip download peft==<installed> --no-binary :all: --no-deps``
   from the package index, then unpacked. `.ci/run` does that, so CI always runs the suite.

The suite must be the installed PEFT's: a folder from another version is refused with a reason naming both.

`testing_common.py` imports ``diffusers`` at module level (for its Stable Diffusion tests, which never run here) and
`testing_utils.py` imports ``datasets`` (for data sets no test used here loads). Rather than installing those large
packages, `load_common()` puts a stand-in module in their place while the suite is imported, and only where the
real package is not installed; the stand-ins are removed from ``sys.modules`` right after, so no other code sees them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

ENV_DIR = "PEFT_TESTS_DIR"
# set by CI: a missing suite is then an error rather than a skip
ENV_REQUIRED = "PEFT_TESTS_REQUIRED"
PACKAGE = "peft_upstream_tests"


def installed_peft() -> str:
    return version("peft")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft_softmix"


def how_to_get() -> str:
    peft = installed_peft()
    return (
        f"run `python tests/peft_upstream.py fetch` (downloads peft=={peft}'s sdist from the package index into "
        f"{cache_root() / f'peft-{peft}'}), or set {ENV_DIR} to the `tests/` folder of peft-{peft}.tar.gz unpacked"
    )


def _sdist_version(folder: Path) -> str | None:
    """The ``Version:`` of an unpacked sdist's PKG-INFO (None when the folder has none)."""
    pkg_info = folder / "PKG-INFO"
    if not pkg_info.is_file():
        return None
    for line in pkg_info.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def find_tests_dir() -> tuple[Path | None, str]:
    """The folder that holds PEFT's ``testing_common.py`` for the installed PEFT, or None and why not."""
    peft = installed_peft()
    given = os.environ.get(ENV_DIR)
    if given:
        folder = Path(given)
        if (folder / "tests" / "testing_common.py").is_file():
            folder = folder / "tests"
        if not (folder / "testing_common.py").is_file():
            return None, f"{ENV_DIR}={given} holds no testing_common.py; {how_to_get()}"
    else:
        folder = cache_root() / f"peft-{peft}" / "tests"
        if not (folder / "testing_common.py").is_file():
            return None, f"PEFT's common test suite is not on this machine: {how_to_get()}"
    found = _sdist_version(folder.parent)
    if found is not None and found != peft:
        return None, f"{folder} comes from peft {found} but peft {peft} is installed; {how_to_get()}"
    return folder, ""


def fetch(target: Path | None = None) -> Path:
    """Download the installed PEFT's sdist from the package index and unpack it; returns its ``tests/`` folder."""
    peft = installed_peft()
    root = target or cache_root()
    folder = root / f"peft-{peft}"
    if (folder / "tests" / "testing_common.py").is_file():
        return folder / "tests"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", f"peft=={peft}", "--no-binary", ":all:", "--no-deps"]
            + ["-d", download],
            check=True,
        )
        (archive,) = Path(download).glob(f"peft-{peft}.tar.gz")
        unpacked = Path(download) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        # renamed into place whole: a crash mid-unpack never leaves a half folder that looks complete
        os.replace(unpacked / f"peft-{peft}", folder)
    return folder / "tests"


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in for {name}, which PEFT's test suite imports but never uses here.")
    if name == "diffusers":
        # testing_common only asks isinstance(model, StableDiffusionPipeline): never true for our models
        module.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # type: ignore[attr-defined]
    elif name == "datasets":

        def load_dataset(*args, **kwargs):
            raise RuntimeError("datasets is not installed: this PEFT test needs it (pip install datasets).")

        module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


@contextmanager
def _stand_ins(names: tuple[str, ...]) -> Iterator[list[str]]:
    """Put a stand-in module for each of ``names`` that is not installed in ``sys.modules``, for the block only."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    for name in missing:
        sys.modules[name] = _stand_in(name)
    try:
        yield missing
    finally:
        for name in missing:
            sys.modules.pop(name, None)


def load_common(folder: Path) -> types.ModuleType:
    """Import ``testing_common`` from ``folder`` as ``peft_upstream_tests.testing_common`` (it imports its sibling
    ``testing_utils`` relatively, so the folder becomes a package of that name)."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]  # type: ignore[attr-defined]
        sys.modules[PACKAGE] = package
    with _stand_ins(("diffusers", "datasets")):
        return importlib.import_module(f"{PACKAGE}.testing_common")


if __name__ == "__main__":
    # python tests/peft_upstream.py fetch [DIR]: prints the tests/ folder (under DIR, else under the cache)
    if sys.argv[1:2] != ["fetch"] or len(sys.argv) > 3:
        sys.exit("usage: python tests/peft_upstream.py fetch [DIR]")
    print(fetch(Path(sys.argv[2]) if len(sys.argv) == 3 else None))
