"""Failure modes a user will hit: broken or hand-edited adapter files, the wrong base model, crashes during a save,
non-determinism and half-precision bases. Each must fail loudly, naming the file or both models, or not happen.

Everything runs on tiny random BERTs saved to a temporary folder, as a Hub checkpoint would be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import peft.peft_model
import peft.utils.save_and_load
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertTokenizerFast

import peft_softmix  # noqa: F401  (registers SOFT_MIXTURE with PEFT)
from peft_softmix import AdapterLoadError, PeftModelForSoftMixture, QueryTooLongError, SoftMixtureConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Dante", "was", "born", "in", "Florence", ".", "Paris", "is"]
WORDS += ["from", ",", "Rome", "Milan"]
TEMPLATES = ["[X] was born in [Y] .", "[X] is from [Y] ."]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_base(path: Path, words: list[str] = WORDS, hidden_size: int = 32, seed: int = 0) -> str:
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    return str(path)


def save_bpe_tokenizer(path: Path) -> str:
    """A RoBERTa-family (byte-level BPE) tokenizer: another family than the adapter's WordPiece."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["Dante was born in Florence .", "Paris is from Rome ."] * 5,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    RobertaTokenizerFast(tokenizer_object=bpe).save_pretrained(path)
    return str(path)


def load_base(path: str, dtype: torch.dtype | None = None):
    model = AutoModelForMaskedLM.from_pretrained(path)
    return (model.to(dtype) if dtype is not None else model).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("reliability")
    base = save_base(root / "base")
    pm = get_peft_model(
        load_base(base), SoftMixtureConfig(templates=TEMPLATES, deep=True, init="random", seed=1, train_weights=True)
    )
    with torch.no_grad():
        pm.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.3, -0.3]))
        pm.prompt_encoder["default"].deep_offsets.normal_(0, 0.1)
    adapter = root / "adapter"
    pm.save_pretrained(adapter)
    return SimpleNamespace(
        root=root,
        base=base,
        adapter=adapter,
        tensors=load_file(adapter / WEIGHTS_FILE),
        wide_base=save_base(root / "wide-base", hidden_size=48),
        big_vocab_base=save_base(root / "big-vocab-base", words=[*WORDS, "Oslo", "Lisbon", "Vienna"]),
        bpe_tokenizer=save_bpe_tokenizer(root / "bpe-tokenizer"),
    )


def broken_copy(files: SimpleNamespace, tmp_path: Path, mutate) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(files.adapter, target)
    mutate(target)
    return target


def edit_config(change):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        change(config)
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return mutate


def edit_tensors(change):
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, folder / WEIGHTS_FILE)

    return mutate


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name: str, size: int):
    def mutate(folder: Path) -> None:
        with open(folder / name, "r+b") as f:
            f.truncate(size)

    return mutate


def test_intact_adapter_loads(files):
    """The baseline the broken copies are measured against: the untouched files load, tensor for tensor."""
    model = PeftModel.from_pretrained(load_base(files.base), files.adapter)
    encoder = model.prompt_encoder["default"]
    for name, saved in files.tensors.items():
        assert torch.equal(getattr(encoder, name), saved), name


# (id, mutation, the file the message must name, what it must say)
CONFIG_CASES = [
    ("invalid-json", write(CONFIG_FILE, b"{templates: oops"), CONFIG_FILE, "not valid JSON"),
    ("truncated-json", truncate(CONFIG_FILE, 40), CONFIG_FILE, "not valid JSON"),
    ("json-list", write(CONFIG_FILE, b"[1, 2]"), CONFIG_FILE, "JSON list"),
    ("no-peft-type", edit_config(lambda c: c.pop("peft_type")), CONFIG_FILE, "['peft_type']"),
    ("other-peft-type", edit_config(lambda c: c.update(peft_type="LORA")), CONFIG_FILE, "peft_type 'LORA'"),
    ("no-templates", edit_config(lambda c: c.pop("templates")), CONFIG_FILE, "['templates']"),
    ("no-token-ids", edit_config(lambda c: c.pop("template_token_ids")), CONFIG_FILE, "['template_token_ids']"),
    ("newer-format", edit_config(lambda c: c.update(format_version=2)), CONFIG_FILE, "format version 2"),
    (
        "template-added",
        edit_config(lambda c: c.update(templates=[*TEMPLATES, "[X] , born in [Y] ."])),
        CONFIG_FILE,
        "lists 3 templates but token ids for 2",
    ),
    (
        "templates-swapped",
        edit_config(lambda c: c.update(templates=TEMPLATES[::-1])),
        CONFIG_FILE,
        "Template 0 '[X] is from [Y] .' was tokenised as [[], [6, 7, 8], [10]]",
    ),
    (
        "unknown-template-word",
        edit_config(lambda c: c.update(templates=["[X] was wed in [Y] .", TEMPLATES[1]])),
        CONFIG_FILE,
        "but as [[], [6, 1, 8], [10]]",
    ),
    (
        "template-without-slot",
        edit_config(lambda c: c.update(templates=["[X] was born in .", TEMPLATES[1]])),
        CONFIG_FILE,
        "has no [Y] slot",
    ),
    ("bad-deep", edit_config(lambda c: c.update(deep="yes")), CONFIG_FILE, "deep must be"),
    (
        "deep-switched-off",
        edit_config(lambda c: c.update(deep=False)),
        WEIGHTS_FILE,
        "unexpected ['deep_offsets']",
    ),
    (
        "tokenizer-gone",
        edit_config(lambda c: c.update(tokenizer_name_or_path="/nonexistent/tokenizer")),
        CONFIG_FILE,
        # another tokenizer than the base model's is never loaded without consent (tests/test_adapter_trust.py
        # passes tokenizer= and gets "Cannot load the tokenizer '/nonexistent/tokenizer'")
        "asks for the tokenizer '/nonexistent/tokenizer', but the base model is",
    ),
]
WEIGHTS_CASES = [
    ("truncated", truncate(WEIGHTS_FILE, 100), WEIGHTS_FILE, "truncated or corrupted"),
    (
        "cut-in-half",
        lambda f: truncate(WEIGHTS_FILE, (f / WEIGHTS_FILE).stat().st_size // 2)(f),
        WEIGHTS_FILE,
        "truncated",
    ),
    ("garbage", write(WEIGHTS_FILE, b"\x00\x01garbage" * 16), WEIGHTS_FILE, "truncated or corrupted"),
    ("missing", lambda f: (f / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "is missing"),
    ("nan", edit_tensors(lambda t: t["soft_words"].view(-1)[3].fill_(float("nan"))), WEIGHTS_FILE, "NaN"),
    ("inf", edit_tensors(lambda t: t["mixture_logits"].fill_(float("inf"))), WEIGHTS_FILE, "NaN or inf"),
    (
        "wrong-shape",
        edit_tensors(lambda t: t.update(soft_words=t["soft_words"][:-1].clone())),
        WEIGHTS_FILE,
        "'soft_words' has shape (6, 32)",
    ),
    ("extra-tensor", edit_tensors(lambda t: t.update(bias=torch.zeros(3))), WEIGHTS_FILE, "unexpected ['bias']"),
    ("missing-tensor", edit_tensors(lambda t: t.pop("mixture_logits")), WEIGHTS_FILE, "missing ['mixture_logits']"),
    ("no-tensors", edit_tensors(lambda t: t.clear()), WEIGHTS_FILE, "missing ['deep_offsets', 'mixture_logits'"),
    (
        "integer-tensor",
        edit_tensors(lambda t: t.update(mixture_logits=torch.zeros(2, dtype=torch.long))),
        WEIGHTS_FILE,
        "dtype torch.int64",
    ),
]


ALL_CASES = {case[0]: case[1:] for case in CONFIG_CASES + WEIGHTS_CASES}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_broken_adapter_files_fail_naming_the_file(files, tmp_path, case):
    mutate, names, says = ALL_CASES[case]
    folder = broken_copy(files, tmp_path, mutate)
    with pytest.raises(AdapterLoadError) as caught:
        PeftModelForSoftMixture.from_pretrained(load_base(files.base), folder)
    message = str(caught.value)
    assert str(folder / names) in message
    assert says in message


# Through PEFT's own entry point peft_softmix's checks run too, except where PEFT parses the file before handing it
# over (invalid JSON, missing or foreign peft_type): those still fail, with PEFT's own message.
PEFT_FIRST = {"invalid-json", "truncated-json", "json-list", "no-peft-type", "other-peft-type"}


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")  # PEFT's, for the LoraConfig case
@pytest.mark.parametrize("case", [*sorted(PEFT_FIRST), "newer-format", "templates-swapped", "missing", "nan"])
def test_peft_entry_point_never_loads_broken_files(files, tmp_path, case):
    mutate, names, says = ALL_CASES[case]
    folder = broken_copy(files, tmp_path, mutate)
    with pytest.raises(Exception) as caught:  # noqa: B017 - the type is PEFT's for the PEFT_FIRST cases
        PeftModel.from_pretrained(load_base(files.base), folder)
    if case not in PEFT_FIRST:
        assert isinstance(caught.value, AdapterLoadError)
        assert str(folder / names) in str(caught.value) and says in str(caught.value)


def test_pickle_is_never_loaded(files, tmp_path, monkeypatch):
    """No adapter_model.safetensors but an adapter_model.bin: refused, and torch.load is never called."""

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load was called on an adapter file")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(peft.utils.save_and_load, "torch_load", no_pickle)
    folder = broken_copy(files, tmp_path, lambda f: (f / WEIGHTS_FILE).rename(f / "adapter_model.bin"))
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        with pytest.raises(AdapterLoadError, match="adapter_model.bin, which peft_softmix never loads") as caught:
            load(load_base(files.base), folder)
        assert str(folder / WEIGHTS_FILE) in str(caught.value)
    # the intact adapter loads without pickle
    PeftModel.from_pretrained(load_base(files.base), files.adapter)


def test_saving_as_pickle_is_refused(files, tmp_path):
    model = PeftModel.from_pretrained(load_base(files.base), files.adapter)
    with pytest.raises(ValueError, match="only as safetensors"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()


def test_failed_load_adapter_leaves_no_half_loaded_adapter(files, tmp_path):
    model = PeftModel.from_pretrained(load_base(files.base), files.adapter)
    batch = model.encode(["Dante"], ["Florence"])
    before = model(**batch).log_probs
    folder = broken_copy(files, tmp_path, WEIGHTS_CASES[4][1])  # a NaN in soft_words
    with pytest.raises(AdapterLoadError, match="NaN"):
        model.load_adapter(folder, adapter_name="second")
    assert "second" not in model.peft_config
    assert "second" not in model.prompt_encoder
    with pytest.raises(ValueError):
        model.set_adapter("second")
    assert torch.equal(model(**batch).log_probs, before)
    # reloading the active adapter from the broken files: refused before any tensor is overwritten
    with pytest.raises(AdapterLoadError, match="NaN"):
        model.load_adapter(folder, adapter_name="default")
    assert torch.equal(model(**batch).log_probs, before)


# -- the wrong base model ------------------------------------------------------------------------------------------


def test_other_hidden_size_is_refused_naming_both(files):
    with pytest.raises(AdapterLoadError) as caught:
        PeftModel.from_pretrained(load_base(files.wide_base), files.adapter)
    message = str(caught.value)
    assert files.base in message and "embedding width 32" in message
    assert files.wide_base in message and "embedding width 48" in message
    assert str(files.adapter / CONFIG_FILE) in message


def test_other_vocabulary_is_refused_naming_both(files):
    with pytest.raises(AdapterLoadError) as caught:
        PeftModel.from_pretrained(load_base(files.big_vocab_base), files.adapter)
    message = str(caught.value)
    assert files.base in message and f"vocabulary {len(WORDS)}," in message
    assert files.big_vocab_base in message and f"vocabulary {len(WORDS) + 3}," in message


def test_other_tokenizer_family_is_refused_naming_both(files, tmp_path):
    folder = broken_copy(files, tmp_path, edit_config(lambda c: c.update(tokenizer_name_or_path=files.bpe_tokenizer)))
    # with the user's consent to the other tokenizer (without it the load stops earlier: tests/test_adapter_trust.py)
    with pytest.raises(AdapterLoadError) as caught:
        PeftModel.from_pretrained(load_base(files.base), folder, tokenizer=files.bpe_tokenizer)
    message = str(caught.value)
    assert "BertTokenizer" in message and "RobertaTokenizer" in message and files.bpe_tokenizer in message


def test_tokenizer_larger_than_the_embedding_table_is_refused(files):
    with pytest.raises(AdapterLoadError) as caught:
        get_peft_model(
            load_base(files.base), SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=files.big_vocab_base)
        )
    assert files.big_vocab_base in str(caught.value) and f"only {len(WORDS)}" in str(caught.value)


def test_query_longer_than_the_model_is_refused_naming_subject_template_and_limit(files):
    model = get_peft_model(
        load_base(files.base), SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=files.base)
    )
    assert model.max_query_length == 64  # the tiny BERT's max_position_embeddings
    fits = " ".join(["Dante"] * (64 - model.query_lengths(["Dante"])[0] + 1))
    too_long = fits + " Dante"
    assert model.query_lengths([fits, too_long]) == [64, 65]
    assert model(**model.encode([fits])).log_probs.isfinite().all()  # exactly the limit still runs
    for call in (lambda: model.encode(["Dante", too_long]), lambda: model.query([too_long])):
        with pytest.raises(QueryTooLongError) as caught:
            call()
        message = str(caught.value)
        assert repr(too_long) in message and "'[X] was born in [Y] .'" in message
        assert "65 tokens" in message and "at most 64" in message and "query_lengths" in message


# -- atomic saves --------------------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_adapter(files, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    shutil.copytree(files.adapter, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    model = PeftModelForSoftMixture.from_pretrained(load_base(files.base), target, is_trainable=True)
    with torch.no_grad():
        model.prompt_encoder["default"].soft_words.add_(1.0)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # the start of a header, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left beside it
    loaded = PeftModel.from_pretrained(load_base(files.base), target)
    assert torch.equal(loaded.prompt_encoder["default"].soft_words, files.tensors["soft_words"])


KILL_MID_SAVE = """
import os, signal, sys
import peft.peft_model
from peft import PeftModel
from transformers import AutoModelForMaskedLM
import peft_softmix

base_path, adapter, target = sys.argv[1:]
model = peft_softmix.PeftModelForSoftMixture.from_pretrained(
    AutoModelForMaskedLM.from_pretrained(base_path), adapter, is_trainable=True
)
model.save_pretrained(target)  # the good, previous checkpoint
real_save = peft.peft_model.safe_save_file

def killed_while_writing(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    with open(filename, "r+b") as f:
        f.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

peft.peft_model.safe_save_file = killed_while_writing
model.prompt_encoder["default"].soft_words.data.add_(1.0)
model.save_pretrained(target)
"""


def test_kill_during_save_keeps_the_previous_adapter(files, tmp_path):
    target = tmp_path / "checkpoint"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, files.base, str(files.adapter), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (target / WEIGHTS_FILE).read_bytes() == (files.adapter / WEIGHTS_FILE).read_bytes()
    loaded = PeftModel.from_pretrained(load_base(files.base), target)
    assert torch.equal(loaded.prompt_encoder["default"].soft_words, files.tensors["soft_words"])


# -- determinism ---------------------------------------------------------------------------------------------------

TRAIN_TINY = f"""
import sys
import torch
from peft import get_peft_model
from transformers import AutoModelForMaskedLM
import peft_softmix

def train(base_path, out, seed):
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForMaskedLM.from_pretrained(base_path),
        peft_softmix.SoftMixtureConfig(templates={TEMPLATES!r}, deep=True, init="random", seed=seed),
    )
    model.train()  # dropout on: the seed has to govern it too
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    facts = [("Dante", "Florence"), ("Paris", "Rome"), ("Milan", "Paris"), ("Rome", "Milan"), ("Florence", "Dante")]
    order = torch.Generator().manual_seed(seed)
    for step in range(6):
        picked = torch.randperm(len(facts), generator=order)[:3].tolist()
        batch = model.encode([facts[i][0] for i in picked], [facts[i][1] for i in picked])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)

for out_and_seed in sys.argv[2:]:
    out, seed = out_and_seed.split("=")
    train(sys.argv[1], out, int(seed))
"""


def test_same_seed_and_data_give_the_same_adapter_bytes_on_cpu(files, tmp_path):
    """Two fresh interpreters, same seed: byte-identical adapters. A third run with another seed differs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    runs = [[f"{tmp_path / 'first'}=0", f"{tmp_path / 'other-seed'}=1"], [f"{tmp_path / 'second'}=0"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN_TINY, files.base, *outputs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for outputs in runs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    first, second, other = (
        (tmp_path / name / WEIGHTS_FILE).read_bytes() for name in ("first", "second", "other-seed")
    )
    assert first == second
    assert first != other  # the comparison can fail: the seed does reach the result


# -- numerics ------------------------------------------------------------------------------------------------------


def test_bf16_base_keeps_the_adapter_in_fp32(files, tmp_path):
    model = get_peft_model(load_base(files.base, torch.bfloat16), SoftMixtureConfig(templates=TEMPLATES, deep=True))
    encoder = model.prompt_encoder["default"]
    assert model.word_embeddings.weight.dtype == torch.bfloat16
    for name, param in encoder.named_parameters():
        assert param.dtype == torch.float32, name
    batch = model.encode(["Dante", "Paris"], ["Florence", "Rome"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert encoder.soft_words.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    loaded = PeftModel.from_pretrained(load_base(files.base, torch.bfloat16), tmp_path / "adapter")
    for name, param in loaded.prompt_encoder["default"].named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, saved[name]), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(loaded(**batch).loss)


def test_hub_adapter_without_safetensors_is_refused_before_any_pickle(files, monkeypatch):
    """A Hub repository that only has adapter_model.bin: the safetensors download is tried first and its failure
    stops the load (the Hub is mocked: the tests run offline)."""
    from huggingface_hub.errors import EntryNotFoundError

    import peft_softmix.serialization as softmix_serialization

    asked = []

    def no_such_file(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise EntryNotFoundError(f"{filename} not found in {repo_id}")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load was called on an adapter file")

    monkeypatch.setattr(softmix_serialization, "hf_hub_download", no_such_file)
    monkeypatch.setattr(peft.utils.save_and_load, "torch_load", no_pickle)
    with pytest.raises(AdapterLoadError, match="never from a pickled adapter_model.bin") as caught:
        PeftModelForSoftMixture.from_pretrained(load_base(files.base), "someone/softmix-adapter")
    assert "'someone/softmix-adapter'" in str(caught.value)
    assert asked == [("someone/softmix-adapter", WEIGHTS_FILE)]
