"""`mix_logits`, the mixture of a forward pass without gradient, against `mix_rows` (the log-space definition)."""

from __future__ import annotations

import pytest
import torch

from peft_softmix import mixture
from peft_softmix.mixture import FactGroups, _chunks, mix_logits, mix_rows


def groups_of(sizes: list[int]) -> FactGroups:
    return FactGroups(tuple(sizes), torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))


def reference(logits: torch.Tensor, log_weights: torch.Tensor, groups: FactGroups) -> torch.Tensor:
    return mix_rows(torch.log_softmax(logits, dim=-1), log_weights, groups)


@pytest.mark.parametrize("rows_per_chunk", [None, 4], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("sizes", [[5, 5, 5], [1, 1], [3, 5, 1, 2, 1, 1]], ids=["uniform", "one-template", "mixed-k"])
def test_mix_logits_is_the_log_space_mixture(sizes, rows_per_chunk, monkeypatch):
    torch.manual_seed(0)
    if rows_per_chunk is not None:  # the scratch buffer holds 4 rows: several chunks, a fact of 5 rows alone
        monkeypatch.setattr(mixture, "_CHUNK_BYTES", rows_per_chunk * 300 * 4)
    groups = groups_of(sizes)
    logits = torch.randn(sum(sizes), 300) * 4
    row_weights = torch.cat([torch.log_softmax(torch.randn(k), 0) for k in sizes])
    torch.testing.assert_close(mix_logits(logits, row_weights, groups), reference(logits, row_weights, groups))
    if len(set(sizes)) == 1:  # one adapter: [K] weights shared by every fact
        shared = row_weights[: sizes[0]]
        torch.testing.assert_close(mix_logits(logits, shared, groups), reference(logits, shared, groups))


def test_chunks_cover_every_fact_once_in_order():
    for sizes, per_chunk in [((5, 5, 5), 10), ((3, 5, 1, 2, 1, 1), 4), ((2,), 1), ((1, 1, 1), 100)]:
        chunks = _chunks(sizes, per_chunk)
        assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == len(sizes)
        for first, end, first_row, end_row in chunks:
            assert first_row == sum(sizes[:first]) and end_row == sum(sizes[:end])
            assert end_row - first_row <= per_chunk or end == first + 1  # a fact larger than a chunk goes alone
    assert _chunks((5, 5, 5), 10) == [(0, 2, 0, 10), (2, 3, 10, 15)]


def test_mix_logits_keeps_the_far_tail_exact():
    # logits 200 apart: in probability space those tokens underflow to 0 (log p = -inf); they are recomputed in log
    # space for their fact, so that ranks in the tail do not tie
    torch.manual_seed(1)
    groups = groups_of([2, 2])
    logits = torch.randn(4, 50)
    logits[0:2, :10] -= 200.0  # fact 0: a far tail
    weights = torch.log_softmax(torch.tensor([0.2, -0.4]), 0)
    mixed = mix_logits(logits, weights, groups)
    expected = reference(logits, weights, groups)
    assert torch.isfinite(mixed).all() and expected[0, :10].max() < -150
    torch.testing.assert_close(mixed, expected)
    assert torch.equal(mixed.argsort(dim=1), expected.argsort(dim=1))


def test_mix_logits_leaves_tokens_outside_the_candidates_at_minus_infinity():
    torch.manual_seed(2)
    groups = groups_of([3, 1])
    candidates = torch.rand(40) > 0.5
    logits = torch.randn(4, 40).masked_fill(~candidates, float("-inf"))
    weights = torch.cat([torch.log_softmax(torch.randn(3), 0), torch.zeros(1)])
    mixed = mix_logits(logits, weights, groups, candidates)
    assert torch.equal(torch.isfinite(mixed), candidates.expand(2, -1))
    torch.testing.assert_close(mixed[:, candidates], reference(logits, weights, groups)[:, candidates])


def test_forward_without_gradient_gives_the_mixture_of_its_template_distributions(base):
    from peft import get_peft_model

    from peft_softmix import SoftMixtureConfig

    pm = get_peft_model(base, SoftMixtureConfig(templates=["[X] was born in [Y] .", "[Y] is the city of [X] ."]))
    batch = pm.encode(["Dante", "Indias", "Bo"])
    with torch.no_grad():
        out = pm(**batch, return_template_log_probs=True)
        direct = pm(**batch)
    assert direct.template_log_probs is None
    torch.testing.assert_close(direct.log_probs, out.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct.log_probs, reference_of(out), atol=1e-5, rtol=0)
    with_grad = pm(**batch)  # the soft words are trainable: the log-space path, differentiable
    assert with_grad.log_probs.requires_grad
    torch.testing.assert_close(with_grad.log_probs.detach(), direct.log_probs, atol=1e-5, rtol=0)


def reference_of(out) -> torch.Tensor:
    K = out.template_log_probs.shape[0] // 3
    per = out.template_log_probs.view(3, K, -1) + out.log_weights.view(3, K, 1)
    return torch.logsumexp(per, dim=1)


def test_mix_logits_stays_in_float32_under_autocast():
    # evaluation under bf16 autocast (Accelerate's mixed precision) still mixes in float32, as log_softmax does
    torch.manual_seed(3)
    groups = groups_of([5, 5])
    logits = torch.randn(10, 300) * 4
    weights = torch.log_softmax(torch.randn(5), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mix_logits(logits, weights, groups)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference(logits, weights, groups), atol=1e-5, rtol=0)
