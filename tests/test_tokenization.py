"""Property test: where `encode_query` puts soft words, the subject and the mask agrees with the tokenizer itself."""

from __future__ import annotations

import string

import pytest
from factories import WORDS, bpe_tokenizer, unigram_tokenizer, wordpiece_tokenizer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from peft_softmix.errors import TemplateError
from peft_softmix.tokenization import (
    HARD,
    MASK,
    SUBJECT,
    _encode,
    _fill,
    _placements,
    _tokenizer_facts,
    encode_queries,
    encode_query,
    template_layout,
)

FAMILIES = {
    "wordpiece": wordpiece_tokenizer,
    "bpe": bpe_tokenizer,
    "unigram": lambda d: unigram_tokenizer(d, mask_token="<mask>"),
    "unigram-bracket-mask": lambda d: unigram_tokenizer(d, mask_token="[MASK]"),
}

# known words (one token), and made-up ones that the tokenizer has to spell out
word = st.one_of(st.sampled_from(WORDS), st.text(alphabet=string.ascii_letters, min_size=1, max_size=6))
stretch = st.lists(word, max_size=3)
subject_word = st.one_of(
    st.sampled_from(WORDS), st.text(alphabet=string.ascii_letters + string.digits + "-'.&", min_size=1, max_size=8)
)
subjects = st.lists(subject_word, min_size=1, max_size=3).map(" ".join)


@st.composite
def templates(draw) -> tuple[str, bool]:
    """A template and whether every piece of it is separated by a space (as in LAMA's templates)."""
    before, between, after = draw(stretch), draw(stretch), draw(stretch)
    assume(before or between or after)
    first, second = draw(st.sampled_from([("[X]", "[Y]"), ("[Y]", "[X]")]))
    pieces = [*before, first, *between, second, *after]
    spaced = draw(st.booleans())
    separators = [" " if spaced else draw(st.sampled_from([" ", " ", ""])) for _ in pieces[1:]]
    text = pieces[0] + "".join(sep + piece for sep, piece in zip(separators, pieces[1:]))
    return text, all(sep == " " for sep in separators)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_tokenizer(request, tmp_path_factory):
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return AutoTokenizer.from_pretrained(folder)


def squeeze(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=templates(), subject=subjects)
def test_placement_matches_the_tokenizer(family_tokenizer, template, subject):
    tokenizer = family_tokenizer
    template, spaced = template
    layout = template_layout(tokenizer, template)
    query = encode_query(tokenizer, layout, subject)
    filled = template.replace("[X]", "\0").replace("[Y]", tokenizer.mask_token).replace("\0", subject)

    # the model sees exactly what the tokenizer makes of the filled sentence
    assert query.input_ids == tokenizer(filled)["input_ids"]
    assert len(query.roles) == len(query.input_ids)

    # one mask, where the tokenizer put the mask token
    assert query.roles.count(MASK) == 1 and query.roles[query.mask_position] == MASK
    assert [i for i, t in enumerate(query.input_ids) if t == tokenizer.mask_token_id] == [query.mask_position]

    # special tokens keep their frozen embeddings
    special = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
    assert all(role == HARD for t, role in zip(query.input_ids, query.roles) if t in special)

    # the subject's tokens spell the subject (a token glued across the slot edge may carry a template character)
    subject_ids = [t for t, role in zip(query.input_ids, query.roles) if role == SUBJECT]
    decoded = squeeze(tokenizer.decode(subject_ids))
    if spaced:
        assert decoded == squeeze(subject)
    else:
        assert squeeze(subject) in decoded

    # every soft word sits on the very token it was initialised from, in template order
    soft = [(role, t) for t, role in zip(query.input_ids, query.roles) if role >= 0]
    assert [role for role, _ in soft] == sorted({role for role, _ in soft})
    assert all(layout.token_ids[role] == t for role, t in soft)
    if not query.mismatched:
        assert [t for _, t in soft] == layout.token_ids
        assert [role for role, _ in soft] == list(range(layout.num_soft_words))
    if spaced:
        # with a space around every slot, no subject can change how the template words tokenise
        assert not query.mismatched, (template, subject, tokenizer.convert_ids_to_tokens(query.input_ids))


def test_every_family_takes_the_direct_tokenizer_path(family_tokenizer):
    # the Rust tokenizer is called directly (the fast path) only after it agreed with tokenizer(...) on probe texts
    assert _tokenizer_facts(family_tokenizer).backend is not None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=templates(), subject=subjects)
def test_direct_tokenizer_path_gives_what_the_tokenizer_gives(family_tokenizer, template, subject):
    tokenizer = family_tokenizer
    facts = _tokenizer_facts(tokenizer)
    filled = template[0].replace("[X]", subject).replace("[Y]", tokenizer.mask_token)
    enc = tokenizer(filled, return_offsets_mapping=True, return_special_tokens_mask=True)
    expected = (enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]], enc["special_tokens_mask"])
    assert _encode(tokenizer, facts, filled) == expected


def test_truncation_left_on_the_rust_tokenizer_sends_queries_through_the_tokenizer(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer(tmp_path))
    layout = template_layout(tokenizer, "[X] was born in [Y] .")
    assert _tokenizer_facts(tokenizer).backend is not None
    # what a user's tokenizer(..., truncation=True, max_length=4) leaves behind; a direct call would cut the query
    tokenizer._tokenizer.enable_truncation(max_length=4)
    query = encode_query(tokenizer, layout, "Dante Alighieri")
    assert len(query.input_ids) > 4
    assert query.input_ids == tokenizer("Dante Alighieri was born in [MASK] .")["input_ids"]


def per_token_query(tokenizer, layout, subject) -> tuple[list[int], list[int], int, bool]:
    """The placement rule of `_placements` and `_roles`, token by token (how it was computed before they worked on
    whole batches of queries as arrays): the reference they must agree with."""
    facts = _tokenizer_facts(tokenizer)
    text, subject_span, mask_span = _fill(layout.template, subject, facts.mask)
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special_mask = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]

    def overlaps(start, end, span):
        return span[0] <= start < span[1] if start == end else start < span[1] and span[0] < end

    first_slot, second_slot = sorted((subject_span[0], mask_span[0]))
    kinds, mask_position = [], -1
    for i, ((start, end), special) in enumerate(zip(offsets, special_mask)):
        if ids[i] == facts.mask_id and mask_position < 0 and overlaps(start, end, mask_span):
            kinds.append(MASK)
            mask_position = i
        elif special or (start == end == 0 and ids[i] in facts.special_ids):
            kinds.append(HARD)
        elif overlaps(start, end, subject_span):
            kinds.append(SUBJECT)
        elif overlaps(start, end, mask_span):
            kinds.append(HARD)
        else:
            kinds.append(0 if start < first_slot else 1 if start < second_slot else 2)
    seen = [[t for t, kind in zip(ids, kinds) if kind == s] for s in range(3)]
    ok = [tuple(seen[s]) == layout.segments[s] for s in range(3)]
    first_word = [0, len(layout.segments[0]), len(layout.segments[0]) + len(layout.segments[1])]
    place, roles = [0, 0, 0], []
    for kind in kinds:
        if kind >= 0:
            roles.append(first_word[kind] + place[kind] if ok[kind] else HARD)
            place[kind] += 1
        else:
            roles.append(kind)
    return ids, roles, mask_position, not all(ok)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(templates(), subjects), min_size=1, max_size=6))
def test_a_batch_of_queries_is_placed_as_each_token_by_token(family_tokenizer, pairs):
    # one encode_queries call over several templates and subjects (the arrays of all queries end to end) gives every
    # query what the per-token rule gives it alone
    tokenizer = family_tokenizer
    layouts = {template: template_layout(tokenizer, template) for (template, _), _ in pairs}
    queries = [(layouts[template], subject) for (template, _), subject in pairs]
    encoded = encode_queries(tokenizer, queries)
    for (layout, subject), query in zip(queries, encoded):
        expected = per_token_query(tokenizer, layout, subject)
        assert (query.input_ids, query.roles, query.mask_position, query.mismatched) == expected


def test_a_query_without_its_mask_token_names_the_text(family_tokenizer):
    layout = template_layout(family_tokenizer, "[X] was born in [Y] .")
    facts = _tokenizer_facts(family_tokenizer)
    fine, lost = _fill(layout.template, "Dante", facts.mask), _fill(layout.template, "Ali", facts.mask)
    encoded = [_encode(family_tokenizer, facts, fine[0]), _encode(family_tokenizer, facts, lost[0])]
    kept = [token for token in zip(*encoded[1]) if token[0] != facts.mask_id]  # as if the mask had split up
    encoded[1] = ([t for t, _, _ in kept], [o for _, o, _ in kept], [s for _, _, s in kept])
    with pytest.raises(TemplateError, match="disappeared when tokenising 'Ali was born in"):
        _placements(facts, [fine, lost], encoded, "Tok")
