"""Prove the PEFT / transformers window: a fresh venv per combination, the test suite and PEFT's conformance tests.

For each combination (``peft==X,transformers==Y``) this creates a new virtual environment, installs
``torch==2.13.0`` first (a loose torch lets pip pick a CUDA build: gigabytes), then this checkout with its test
extras and the pinned PEFT and transformers, fetches the installed PEFT's own test suite (tests/peft_upstream.py),
and runs ``python -m pytest`` (the whole suite, conformance tests included, which must not skip for want of PEFT's
suite). It writes the table (combination, result, counts, run time, command) into docs/compatibility.md, between the
markers there. Run before each release; commit the table:

    python scripts/compat_matrix.py                                  # the window's ends (WINDOW_ENDS)
    python scripts/compat_matrix.py --combo peft==0.21.2,transformers==5.24.0 --pytest-args "-x -q -m 'not slow'"

One combination at a time (each one uses the CPU fully); ``--keep`` keeps the venvs under ``--work``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compatibility.md"
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"
TORCH = "torch==2.13.0"
# the oldest and newest releases of the window that pyproject.toml claims
WINDOW_ENDS = ["peft==0.21.0,transformers==5.23.0", "peft==0.21.2,transformers==5.24.0"]
DEFAULT_PYTEST_ARGS = "-x -q -p no:cacheprovider"
SHOWN_PACKAGES = ("torch", "transformers", "peft", "huggingface-hub", "accelerate", "tokenizers")
COUNTS = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


@dataclass
class Outcome:
    combo: str
    result: str = "not run"
    counts: dict[str, int] = field(default_factory=dict)
    install_s: float = 0.0
    test_s: float = 0.0
    versions: str = ""
    detail: str = ""


def run(cmd: list[str], log, env: dict[str, str] | None = None, cwd: Path = ROOT) -> int:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 passed, 1 skipped, 2 xfailed in 4.5s``)."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if not lines:
        return {}
    pairs = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", lines[-1])
    found = {word: int(n) for n, word in pairs}
    if "error" in found:
        found["errors"] = found.pop("error")
    return found


def check_combo(combo: str, work: Path, pytest_args: str, keep: bool) -> Outcome:
    outcome = Outcome(combo)
    pins = [pin.strip() for pin in combo.split(",") if pin.strip()]
    venv = work / re.sub(r"[^A-Za-z0-9.]+", "_", combo)
    log_path = work / f"{venv.name}.log"
    python = venv / "bin" / "python"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(venv / "hf-home"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PEFT_TESTS_REQUIRED": "1",
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)
    with open(log_path, "w", encoding="utf-8") as log:
        t0 = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", TORCH],
            [str(python), "-m", "pip", "install", "-q", "-e", ".[test]", *pins],
            [str(python), str(ROOT / "tests" / "peft_upstream.py"), "fetch"],
        ]
        for step in steps:
            if run(step, log, env) != 0:
                outcome.result, outcome.detail = "install failed", f"see {log_path}"
                outcome.install_s = time.monotonic() - t0
                return outcome
        outcome.install_s = time.monotonic() - t0
        freeze = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
        pairs = (line.split("==", 1) for line in freeze.stdout.splitlines() if "==" in line)
        installed = {name.lower().replace("_", "-"): found for name, found in pairs}
        outcome.versions = ", ".join(f"{name} {installed[name]}" for name in SHOWN_PACKAGES if name in installed)
        t1 = time.monotonic()
        log.write("::: tests\n")
        log.flush()
        start = log.tell()
        code = run([str(python), "-m", "pytest", *shlex.split(pytest_args)], log, env)
        outcome.test_s = time.monotonic() - t1
    text = log_path.read_text(encoding="utf-8", errors="replace")[start:]
    outcome.counts = pytest_counts(text)
    outcome.result = "pass" if code == 0 else f"fail (exit {code})"
    if code != 0:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        outcome.detail = "; ".join(failed[:3]) or f"see {log_path}"
    if not keep and code == 0:
        shutil.rmtree(venv, ignore_errors=True)
    return outcome


def table(outcomes: list[Outcome], pytest_args: str) -> str:
    rows = [
        "| combination | installed | result | passed / failed / skipped / xfailed | install + tests (s) | command |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        counts = " / ".join(str(o.counts.get(name, 0)) for name in ("passed", "failed", "skipped", "xfailed"))
        extra = "".join(f", {o.counts[name]} {name}" for name in ("errors", "xpassed") if o.counts.get(name))
        result = o.result + (f": {o.detail}" if o.detail else "")
        command = f'`python scripts/compat_matrix.py --combo {o.combo} --pytest-args "{pytest_args}"`'
        rows.append(
            f"| {o.combo.replace(',', ', ')} | {o.versions} | {result} | {counts}{extra} | "
            f"{o.install_s:.0f} + {o.test_s:.0f} | {command} |"
        )
    stamp = time.strftime("%Y-%m-%d")
    return "\n".join([f"Run on {stamp}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.", "", *rows])


def write_doc(section: str, replace: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from peft_softmix.atomic import write_text_atomic

    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the markers {START} ... {END}; restore them before writing the table.")
    head, rest = text.split(START, 1)
    old, tail = rest.split(END, 1)
    if not replace and old.strip():
        # --append: keep the rows already there (a combination run on its own adds its row)
        kept = [line for line in old.strip().splitlines() if line.startswith("| ") and "combination" not in line]
        new_rows = section.splitlines()
        section = "\n".join(new_rows[:4] + kept + new_rows[4:])
    write_text_atomic(DOC, f"{head}{START}\n{section}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combo", action="append", help="e.g. peft==0.21.2,transformers==5.24.0 (repeatable)")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS, help=f"default: {DEFAULT_PYTEST_ARGS!r}")
    parser.add_argument("--work", type=Path, help="where the venvs and logs go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep every venv (a failed one is always kept)")
    parser.add_argument("--append", action="store_true", help="add rows to the table instead of replacing it")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    combos = args.combo or WINDOW_ENDS
    work = args.work or Path(tempfile.mkdtemp(prefix="peft-softmix-compat."))
    work.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for combo in combos:
        print(f"::: {combo} (log: {work})", flush=True)
        outcome = check_combo(combo, work, args.pytest_args, args.keep)
        seconds = outcome.install_s + outcome.test_s
        print(f"::: {combo}: {outcome.result} {outcome.counts} in {seconds:.0f} s", flush=True)
        outcomes.append(outcome)
    section = table(outcomes, args.pytest_args)
    print(section)
    if not args.no_doc:
        write_doc(section, replace=not args.append)
    return 0 if all(o.result == "pass" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
