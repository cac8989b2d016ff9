"""The flat soft-word positions and the per-layer offsets, against dense reference computations."""

import pytest
import torch

from peft_softmix.hooks import SoftPositions, deep_prompt_hooks
from peft_softmix.peft_model import mix_templates

# two rows of five tokens: soft words 0, 1 in row 0 (positions 1, 4), soft word 2 in row 1 (position 0)
SOFT_INDEX = torch.tensor([[-1, 0, -1, -1, 1], [2, -1, -1, -1, -1]])


def dense(positions: SoftPositions) -> torch.Tensor:
    """The ``[N, T]`` soft index that ``positions`` describes (-1 where no soft word sits)."""
    out = torch.full((positions.num_rows * positions.length,), -1)
    out[positions.index] = positions.words
    return out.view(positions.num_rows, positions.length)


def test_positions_round_trip_the_soft_index():
    positions = SoftPositions.of(SOFT_INDEX)
    assert positions.index.tolist() == [1, 4, 5]
    assert positions.words.tolist() == [0, 1, 2]
    assert torch.equal(dense(positions), SOFT_INDEX)


def test_padded_rows_keep_each_word_in_its_row_and_column():
    padded = SoftPositions.of(SOFT_INDEX).padded_to(8)
    assert torch.equal(dense(padded), torch.nn.functional.pad(SOFT_INDEX, (0, 3), value=-1))


def test_shifted_rows_move_right_and_drop_the_last_column():
    shifted = SoftPositions.of(SOFT_INDEX).shifted_right()
    expected = torch.nn.functional.pad(SOFT_INDEX[:, :-1], (1, 0), value=-1)
    assert torch.equal(dense(shifted), expected)
    # soft word 1 sat in row 0's last position: it has no place in the shifted row
    assert 1 not in shifted.words.tolist()


def test_deep_offsets_and_their_gradient_match_a_dense_gather():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3, requires_grad=True)
    offsets = torch.randn(1, 3, 3, requires_grad=True)
    layer = torch.nn.Identity()
    with deep_prompt_hooks([layer], offsets, SoftPositions.of(SOFT_INDEX)):
        hooked = layer(hidden)
    # the dense way: a zero row for the positions without a soft word, gathered at every position
    padded = torch.cat([offsets[0], torch.zeros(1, 3)])
    reference = hidden + padded[torch.where(SOFT_INDEX >= 0, SOFT_INDEX, 3)]
    torch.testing.assert_close(hooked, reference)
    weights = torch.randn_like(hooked)
    grads = torch.autograd.grad((hooked * weights).sum(), (hidden, offsets))
    expected = torch.autograd.grad((reference * weights).sum(), (hidden, offsets))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_deep_offsets_follow_rows_padded_inside_the_model():
    offsets = torch.randn(1, 3, 4)
    layer = torch.nn.Identity()
    with deep_prompt_hooks([layer], offsets, SoftPositions.of(SOFT_INDEX)):
        out = layer(torch.zeros(2, 8, 4))  # Longformer pads rows to its attention window inside
    index = torch.nn.functional.pad(torch.where(SOFT_INDEX >= 0, SOFT_INDEX, 3), (0, 3), value=3)
    torch.testing.assert_close(out, torch.cat([offsets[0], torch.zeros(1, 4)])[index])


def test_deep_hooks_add_each_layers_own_offsets_only_to_the_first_layers():
    torch.manual_seed(0)
    layers = [torch.nn.Identity() for _ in range(3)]
    offsets = torch.randn(2, 3, 4)  # offsets for the first two of three layer calls
    positions = SoftPositions.of(SOFT_INDEX)
    hidden = torch.zeros(2, 5, 4)
    seen = []
    with deep_prompt_hooks(layers, offsets, positions):
        for layer in layers:
            hidden = layer(hidden)
            seen.append(hidden.clone())
    index = torch.where(SOFT_INDEX >= 0, SOFT_INDEX, 3)
    first = torch.cat([offsets[0], torch.zeros(1, 4)])[index]
    second = first + torch.cat([offsets[1], torch.zeros(1, 4)])[index]
    torch.testing.assert_close(seen[0], first)
    torch.testing.assert_close(seen[1], second)
    torch.testing.assert_close(seen[2], second)  # no offsets beyond the deep layers


def test_one_template_is_its_own_mixture():
    per_template = torch.log_softmax(torch.randn(4, 1, 7), dim=-1)
    log_weights = torch.log_softmax(torch.zeros(1), dim=0)
    general = torch.logsumexp(per_template + log_weights[None, :, None], dim=1)
    torch.testing.assert_close(mix_templates(per_template, log_weights), general, rtol=0, atol=0)
    two = torch.log_softmax(torch.randn(4, 2, 7), dim=-1)
    weights = torch.log_softmax(torch.tensor([0.3, -1.0]), dim=0)
    expected = torch.log(weights.exp()[0] * two[:, 0].exp() + weights.exp()[1] * two[:, 1].exp())
    torch.testing.assert_close(mix_templates(two, weights), expected)


def test_hooks_are_removed_when_the_forward_inside_raises():
    layer = torch.nn.Linear(4, 4)
    hooks = deep_prompt_hooks([layer], torch.zeros(1, 3, 4), SoftPositions.of(SOFT_INDEX))
    with pytest.raises(RuntimeError, match="Deep prompts could not find the hidden states"), hooks:
        layer(torch.zeros(3, 4))  # not the [N, T, H] layout the hook expects
    assert not layer._forward_pre_hooks
    assert torch.equal(layer(torch.zeros(3, 4)), layer.bias.expand(3, 4))  # runs as the bare layer again
