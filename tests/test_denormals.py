"""Denormal floats: the library's training loop flushes them on a CPU (a mixture's backward makes many, and a CPU
computes with them many times slower), changes nothing a step can see, and gives the thread its setting back."""

from __future__ import annotations

import pytest
import torch
from test_trainer import fresh_accelerate_state, fx, run  # noqa: F401  (fixtures)

from peft_softmix import flush_denormals
from peft_softmix.denormals import flushing_denormals
from peft_softmix.trainer import RelationTrainer

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")


def test_the_block_flushes_and_then_restores_the_threads_setting():
    tiny = torch.tensor(1e-39)
    assert not flushing_denormals() and float(tiny * 1.0) > 0.0  # kept by default
    with flush_denormals():
        assert flushing_denormals() and float(tiny * 1.0) == 0.0
        with flush_denormals():
            pass
        assert flushing_denormals()  # an inner block gives back what it found: on
    assert not flushing_denormals()
    with flush_denormals(enabled=False):
        assert not flushing_denormals()
    torch.set_flush_denormal(True)  # a user's own choice survives the block
    try:
        with flush_denormals():
            pass
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_a_backward_with_flushing_differs_only_below_the_smallest_normal_float():
    """A two-template mixture where one template is ~100 nats worse: its posterior underflows to denormals."""
    torch.manual_seed(0)
    weights = torch.randn(16, 32, requires_grad=True)
    inputs = torch.randn(8, 16)

    def grads() -> torch.Tensor:
        weights.grad = None
        log_p = (inputs @ weights).log_softmax(-1)[:, 0]
        rows = torch.stack([log_p, log_p - 100.0], dim=1)  # the second template far worse
        (-torch.logsumexp(rows + torch.log(torch.tensor([0.5, 0.5])), dim=1).sum()).backward()
        return weights.grad.clone()

    kept = grads()
    with flush_denormals():
        flushed = grads()
    assert torch.allclose(kept, flushed, rtol=0, atol=1.2e-38)


def test_the_training_loop_runs_its_epochs_with_denormals_flushed(fx, tmp_path, monkeypatch):  # noqa: F811
    seen: list[bool] = []
    epoch = RelationTrainer._train_epoch

    def spy(self, *args, **kwargs):
        seen.append(flushing_denormals())
        return epoch(self, *args, **kwargs)

    monkeypatch.setattr(RelationTrainer, "_train_epoch", spy)
    run(fx, tmp_path / "out", num_train_epochs=2)
    assert seen == [True, True]
    assert not flushing_denormals()  # evaluation and the caller's code after it: as before
