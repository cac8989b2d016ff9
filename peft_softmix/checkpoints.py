"""Per-relation training checkpoints: what is saved each epoch, where, and what a resumed run must share.

A checkpoint folder ``epoch_N`` holds Accelerate's state (optimizer, the random states of every process) and ours,
as JSON and safetensors rather than pickles: ``training_state.json`` (epoch, best dev score, history, settings),
``adapter_state.safetensors`` (the adapter's tensors, current and best: never the frozen base model) and
``fingerprint.json`` (what defines the run: the relation, the settings that shape parameters and batches, the
templates and a hash of the facts). It is written under a hidden staging name and published with one rename
(`peft_softmix.atomic.publish_folder`), so a kill mid-save leaves the previous epoch's checkpoint as it was.

Resuming compares the fingerprint first, before any optimizer state is loaded, and names each difference; it reads
every file of the checkpoint before using it, names a broken one, and ``latest`` falls back to the previous good
epoch. ``run.json`` beside the ``epoch_N`` folders names the run that wrote them, so ``latest`` never picks up the
checkpoints of an earlier run into the same output folder.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import publish_folder, write_json_atomic
from .errors import ResumeError

__all__ = [
    "ADAPTER_FILE",
    "FINGERPRINT_FILE",
    "RUN_FILE",
    "STATE_FILE",
    "ResumeError",
    "TrainingState",
    "as_json",
    "checkpoint_dir",
    "compare_settings",
    "find_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_points",
    "save_checkpoint",
    "start_run",
    "verify_checkpoint",
]

STATE_FILE = "training_state.json"
ADAPTER_FILE = "adapter_state.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
RUN_FILE = "run.json"


class TrainingState:
    """The training state of the current relation, saved with every checkpoint beside Accelerate's."""

    def __init__(self) -> None:
        self.reset(None, {})

    def reset(self, relation: str | None, settings: dict[str, Any], run_id: str = "") -> None:
        self.relation = relation
        self.settings = settings
        self.run_id = run_id
        self.epoch = 0
        self.best_p1 = -1.0
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict[str, float]] = []
        self.adapter: dict[str, torch.Tensor] = {}
        self.best_adapter: dict[str, torch.Tensor] = {}

    def save(self, folder: Path) -> None:
        scalars = {k: v for k, v in vars(self).items() if k not in ("adapter", "best_adapter")}
        (folder / STATE_FILE).write_text(json.dumps(scalars, indent=2, default=str) + "\n", encoding="utf-8")
        tensors = {f"adapter.{k}": v.contiguous() for k, v in self.adapter.items()}
        tensors.update({f"best_adapter.{k}": v.contiguous() for k, v in self.best_adapter.items()})
        save_file(tensors, str(folder / ADAPTER_FILE))

    def load(self, folder: Path) -> None:
        for key, value in json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).items():
            setattr(self, key, value)
        self.adapter, self.best_adapter = {}, {}
        for name, tensor in load_file(str(folder / ADAPTER_FILE)).items():
            which, key = name.split(".", 1)
            getattr(self, which)[key] = tensor


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so that saved and current settings
    compare equal."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_dir(output_dir: str | Path, relation: str) -> Path:
    """Where a run in ``output_dir`` keeps ``relation``'s ``epoch_N`` checkpoints."""
    return Path(output_dir) / relation / "checkpoints"


_HOOKED: weakref.WeakSet[Any] = weakref.WeakSet()


def _drop_model_weights(accelerator) -> None:
    """Checkpoints hold the adapter in our own files: Accelerate must not save the models (the frozen base)."""
    if accelerator in _HOOKED:
        return
    _HOOKED.add(accelerator)

    def save_hook(models, weights, output_dir):
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def start_run(accelerator, root: str | Path, run_id: str | None = None) -> str:
    """Mark ``root``'s checkpoints as this run's (a new id unless ``run_id``, a resumed run's); returns the id."""
    run_id = run_id or uuid.uuid4().hex
    if accelerator.is_main_process:
        write_json_atomic(Path(root) / RUN_FILE, {"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return run_id


def save_checkpoint(accelerator, root: str | Path, epoch: int, state: TrainingState, fingerprint: dict) -> Path:
    """Save Accelerate's state and ours to ``root/epoch_N`` through a staging folder (a crash never leaves half)."""
    _drop_model_weights(accelerator)
    root = Path(root)
    final = root / f"epoch_{epoch}"
    staging = root / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # every process writes its own RNG state file into the staging folder; the main process writes the rest
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        state.save(staging)
        (staging / FINGERPRINT_FILE).write_text(json.dumps(as_json(fingerprint), indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_folder(staging, final)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: str | Path, num_processes: int = 1) -> None:
    """Read every file of a checkpoint; a `ResumeError` names the first one that is missing or cannot be read."""
    path = Path(path)
    needed = [STATE_FILE, ADAPTER_FILE, FINGERPRINT_FILE, *(f"random_states_{i}.pkl" for i in range(num_processes))]
    for name in needed:
        if not (path / name).is_file():
            raise ResumeError(f"Checkpoint {path} has no {name}; it is incomplete or not a checkpoint of this run.")
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                load_file(str(file))
            elif file.suffix in (".bin", ".pkl", ".pt"):
                # our own checkpoint, written by Accelerate: its optimizer and random states are pickles
                torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated file fails in many ways (EOFError, OSError, UnpicklingError, ...)
            raise ResumeError(f"Checkpoint file {file} cannot be read ({type(err).__name__}: {err}).") from None


def _epochs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(p.name[6:]), p) for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_")]
    return sorted((e for e in found if e[1].name[6:].isdigit()), reverse=True)


def _run_id(folder: Path, name: str) -> str | None:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The ``epoch_N`` folder with the highest N that the run named in ``root/run.json`` wrote (None if none)."""
    return find_resumable(root, verify=False)[0]


def find_resumable(root: str | Path, num_processes: int = 1, verify: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``root``'s current run that reads back whole, and a note for each one skipped."""
    root = Path(root)
    current = _run_id(root, RUN_FILE)
    notes = []
    for _, path in _epochs(root):
        if current is not None and _run_id(path, FINGERPRINT_FILE) != current:
            continue  # an earlier run's checkpoint, left in this folder
        if verify:
            try:
                verify_checkpoint(path, num_processes)
            except ResumeError as err:
                notes.append(f"{err} Falling back to the previous epoch.")
                continue
        return path, notes
    return None, notes


def resume_points(
    resume_from: str | None, output_dir: str | Path, relations: list[str], num_processes: int = 1
) -> tuple[dict[str, Path | None], list[str]]:
    """Which checkpoint each relation resumes from (None: it starts afresh), and what was decided, to report.

    ``resume_from`` is None, ``"latest"`` (each relation's newest readable checkpoint of the last run in
    ``output_dir``) or one ``<output_dir>/<relation>/checkpoints/epoch_N`` folder (that relation resumes, the
    others start afresh).
    """
    points: dict[str, Path | None] = dict.fromkeys(relations)
    notes: list[str] = []
    if resume_from is None:
        return points, notes
    if resume_from == "latest":
        for relation in relations:
            root = checkpoint_dir(output_dir, relation)
            points[relation], skipped = find_resumable(root, num_processes)
            notes += skipped
            found = points[relation]
            notes.append(
                f"{relation}: --resume_from_checkpoint latest is {found}"
                if found
                else f"{relation}: --resume_from_checkpoint latest: no checkpoint of the last run in {root}; "
                "this relation starts afresh."
            )
        return points, notes
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ResumeError(
            f"--resume_from_checkpoint {path} is not a checkpoint of this script (no {STATE_FILE}); give a "
            "<output_dir>/<relation>/checkpoints/epoch_N folder or 'latest'."
        )
    relation = path.resolve().parent.parent.name
    if relation not in points:
        raise ResumeError(
            f"--resume_from_checkpoint {path} belongs to relation {relation!r}, which is not in this run "
            f"({', '.join(relations)}). Add it to --relations."
        )
    verify_checkpoint(path, num_processes)
    points[relation] = path
    return points, notes


def compare_settings(
    checkpoint: str | Path,
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    adjustable: tuple[str, ...],
    unrecorded: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Check that a checkpoint's settings match this run's; return the ``adjustable`` ones that changed.

    Settings are named as the flags (fields) that set them. A resumed run may change an adjustable setting (a lower
    learning rate after the loss diverged: the result then differs from an uninterrupted run); any other difference
    is a `ResumeError` naming each setting with its two values. ``unrecorded`` gives the value of a setting that
    checkpoints of earlier versions did not record (the behaviour they had).
    """
    now = as_json(dict(now))
    saved = {**as_json(dict(unrecorded or {})), **saved}
    differ = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    fixed = {k: d for k, d in differ.items() if k not in adjustable}
    if fixed:
        listed = "; ".join(f"--{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in fixed.items())
        raise ResumeError(
            f"Checkpoint {checkpoint} was made with other settings ({listed}). Resume with the same arguments, or "
            "start afresh in another --output_dir."
        )
    return differ


def load_checkpoint(
    accelerator,
    checkpoint: str | Path,
    state: TrainingState,
    fingerprint: Mapping[str, Any],
    settings: Mapping[str, Any],
    adjustable: tuple[str, ...],
    unrecorded: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Resume from ``checkpoint`` into ``state`` and Accelerate's prepared objects; returns the ``adjustable``
    settings that changed. The fingerprint is compared first, so a run that differs (another relation, other flags
    that shape parameters, other templates or facts) never reaches the optimizer's state, and each difference is
    named. ``unrecorded``: settings that checkpoints of earlier versions did not record, and the value they had."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint, accelerator.num_processes)
    saved = json.loads((checkpoint / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    if saved.get("relation") != fingerprint["relation"]:
        raise ResumeError(
            f"Checkpoint {checkpoint} is for relation {saved.get('relation')}, not {fingerprint['relation']}."
        )
    differences = []
    for group, flag in (("settings", "--"), ("data", "")):
        old_values, new_values = saved.get(group, {}), as_json(fingerprint[group])
        if group == "settings":
            old_values = {**as_json(dict(unrecorded or {})), **old_values}
        for name, new in new_values.items():
            if old_values.get(name) != new:
                differences.append(f"{flag}{name}: checkpoint {old_values.get(name)!r}, now {new!r}")
    if differences:
        raise ResumeError(
            f"Checkpoint {checkpoint} was made by a different run ({'; '.join(differences)}). Resume with the same "
            "arguments and data, or start afresh in another --output_dir."
        )
    _drop_model_weights(accelerator)
    accelerator.load_state(str(checkpoint))
    state.load(checkpoint)
    return compare_settings(checkpoint, state.settings, settings, adjustable, unrecorded)
