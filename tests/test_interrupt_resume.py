"""`examples/train_trex.py` under failure: SIGKILL in the middle of an epoch, then `--resume_from_checkpoint latest`,
ends with the adapter of a run that was never interrupted (bitwise, CPU, same seed); a rank that fails in a
two-process run stops the whole run with its error instead of leaving the other rank waiting.

Every run is a fresh interpreter with one thread, so the uninterrupted and the resumed runs compute alike.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_bert, script_environment, two_process_launch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_trex.py"
SUBJECTS = ["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Gina", "Hugo", "Ivo", "Lara", "Marco", "Nina"]
CITIES = ["Paris", "Rome", "Milan", "Berlin", "Madrid", "Lisbon"]
TEMPLATES = ["[X] was born in [Y] .", "[X] is from [Y] ."]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SCRIPT.is_file(), reason="examples/train_trex.py is not there")]

# Runs the script as `__main__`, with a hook in the training batches (those computed with gradients):
# PAUSE_MARKER: once PAUSE_AFTER (a checkpoint folder) exists, announce the second training batch after it in the
#   marker file and wait there to be killed (the middle of the next epoch);
# FAIL_RANK: that rank raises on its first training batch.
WRAPPER = r"""
import os, runpy, sys, time
import torch
import peft_softmix.trainer as trainer

real_model_inputs = trainer.model_inputs
seen = 0

def model_inputs(batch):
    global seen
    if torch.is_grad_enabled():
        if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0"):
            raise RuntimeError(f"injected failure on rank {os.environ['FAIL_RANK']}")
        if "PAUSE_MARKER" in os.environ and os.path.isdir(os.environ["PAUSE_AFTER"]):
            seen += 1
            if seen == 2:
                open(os.environ["PAUSE_MARKER"], "w").close()
                time.sleep(600)
    return real_model_inputs(batch)

trainer.model_inputs = model_inputs  # the library's training loop calls it from here
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    """A tiny BERT with dropout (so the restored random state matters) and one relation of synthetic facts."""
    root = tmp_path_factory.mktemp("interrupt")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "was", "born", "in", "is", "from", ".", *SUBJECTS, *CITIES]
    save_tiny_bert(root / "model", vocab, dropout=0.1)
    rng = random.Random(0)
    subjects = iter(rng.sample([f"{a} {b}" for a in SUBJECTS for b in SUBJECTS if a != b], 72))
    for split, n in (("train", 40), ("dev", 16), ("test", 16)):
        records = [
            {"sub_label": next(subjects), "obj_label": "Paris" if rng.random() < 0.6 else rng.choice(CITIES)}
            for _ in range(n)
        ]
        write_jsonl(root / "trex" / "P19" / f"{split}.jsonl", records)
    write_jsonl(root / "templates" / "lpaqa_mined.jsonl", [{"relation": "P19", "template": t} for t in TEMPLATES])
    (root / "wrapper.py").write_text(WRAPPER)
    return SimpleNamespace(root=root)


def script_args(fx, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(fx.root / "model"),
        "--data_dir",
        str(fx.root / "trex"),
        "--templates_dir",
        str(fx.root / "templates"),
        "--templates",
        "mined",
        "--relations",
        "P19",
        "--num_templates",
        "2",
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",  # 40 facts: 5 steps an epoch
        "--learning_rate",
        "0.1",
        "--num_train_epochs",
        "3",
        "--patience",
        "10",
        "--init",
        "random",
        "--deep",
        *extra,
    ]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a chatty run can never block on a full pipe
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def checkpoint_adapter(out: Path, epoch: int) -> dict[str, torch.Tensor]:
    path = out / "P19" / "checkpoints" / f"epoch_{epoch}" / "adapter_state.safetensors"
    return {k.split(".", 1)[1]: v for k, v in load_file(path).items() if k.startswith("adapter.")}


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(fx, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    marker = tmp_path / "paused-in-epoch-2"
    python = [sys.executable, str(fx.root / "wrapper.py"), str(SCRIPT)]
    runs = {
        "straight": start(python + script_args(fx, straight), script_environment(), tmp_path / "straight.log"),
        "killed": start(
            python + script_args(fx, resumed),
            script_environment(PAUSE_MARKER=str(marker), PAUSE_AFTER=str(resumed / "P19" / "checkpoints" / "epoch_1")),
            tmp_path / "killed.log",
        ),
    }
    killed = runs["killed"]
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert killed.poll() is None, "the run ended before epoch 2:\n" + (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no pause in epoch 2 within 300 s"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (resumed / "P19" / "checkpoints").glob("epoch_*"))
    assert checkpoints == ["epoch_1"]  # killed in epoch 2: nothing after the first checkpoint
    assert not (resumed / "P19" / "adapter").exists()

    log = tmp_path / "resumed.log"
    resume = start(
        [sys.executable, str(SCRIPT), *script_args(fx, resumed, "--resume_from_checkpoint", "latest")],
        script_environment(),
        log,
    )
    for name, proc in (("resumed", resume), ("straight", runs["straight"])):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    assert "resuming from" in log.read_text()

    a, b = checkpoint_adapter(straight, 3), checkpoint_adapter(resumed, 3)
    assert a.keys() == b.keys() == {"soft_words", "deep_offsets", "mixture_logits"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["soft_words"], checkpoint_adapter(straight, 1)["soft_words"])  # epochs 2-3 did train
    weights = Path("P19") / "adapter" / "adapter_model.safetensors"
    assert (straight / weights).read_bytes() == (resumed / weights).read_bytes()
    # the per-epoch log (losses, dev P@1) carries over the kill as well; compared as text since epoch 0 has NaN
    histories = [
        json.loads((out / "results.json").read_text())["relations"]["P19"]["history"] for out in (straight, resumed)
    ]
    assert json.dumps(histories[0]) == json.dumps(histories[1])
    assert [h["epoch"] for h in histories[0]] == [0, 1, 2, 3]


def test_a_failing_rank_stops_a_two_process_run_with_its_error(fx, tmp_path):
    cmd = [
        *two_process_launch(29600),
        str(fx.root / "wrapper.py"),
        str(SCRIPT),
        *script_args(fx, tmp_path / "out"),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=script_environment(FAIL_RANK="1"), timeout=240, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "injected failure on rank 1" in output, output[-4000:]
    assert "DistributedType.MULTI_CPU" in output  # it really ran as two processes
    assert time.monotonic() - started < 240
    assert not (tmp_path / "out" / "P19" / "adapter").exists()
