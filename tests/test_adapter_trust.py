"""An adapter from the Hub is untrusted input: attacks through its files, and what the loader does about them.

Each test edits a saved adapter the way an attacker could (a config naming a tokenizer with custom code, download
options, a redefined mask token, tensors scaled by 1e37) and checks that the loader refuses it, naming the file and
the key or tensor, without running anything. See peft_softmix/trust.py and docs/reliability.md ("Trust model").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

import peft_softmix
import peft_softmix.trust as trust
from peft_softmix import AdapterLoadError, PeftModelForSoftMixture, SoftMixtureConfig

TEMPLATES = ["[X] was born in [Y] .", "[X] is from [Y] ."]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUBJECTS = ["Dante", "Ali"]


def load_base(tiny_dir: Path):
    return AutoModelForMaskedLM.from_pretrained(str(tiny_dir)).eval()


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory) -> Path:
    """An honest adapter, trained on the tiny BERT loaded from `tiny_dir` (so it names no tokenizer of its own)."""
    pm = get_peft_model(load_base(tiny_dir), SoftMixtureConfig(templates=TEMPLATES, deep=True, init="random", seed=1))
    with torch.no_grad():
        pm.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.4, -0.4]))
        pm.prompt_encoder["default"].deep_offsets.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("trust") / "adapter"
    pm.save_pretrained(path)
    return path


def edited(adapter: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    """A copy of the adapter with its config and/or tensors changed by the given functions."""
    target = tmp_path / "edited-adapter"
    shutil.copytree(adapter, target)
    if config is not None:
        data = json.loads((target / CONFIG_FILE).read_text())
        config(data)
        (target / CONFIG_FILE).write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(target / WEIGHTS_FILE)
        tensors(data)
        save_file(data, target / WEIGHTS_FILE)
    return target


def answers(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**model.encode(SUBJECTS)).log_probs


# -- code execution behind a prompt ----------------------------------------------------------------------------


def evil_tokenizer(tiny_dir: Path, folder: Path, marker: Path) -> Path:
    """The base model's tokenizer files plus an `auto_map` pointing at a module that writes ``marker`` on import."""
    folder.mkdir(parents=True)
    for name in os.listdir(tiny_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(tiny_dir / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # an unknown class leaves transformers nothing local to fall back on: it asks whether to run the custom code
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import BertTokenizer\n\n\nclass EvilTokenizer(BertTokenizer):\n    pass\n"
    )
    return folder


def run_answering_yes(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose stdin answers "y" to every prompt (the worst case: a user who
    accepts)."""
    package_root = str(Path(peft_softmix.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": package_root, "HF_HUB_OFFLINE": "1"}
    env["HF_MODULES_CACHE"] = str(cwd / "modules")  # where transformers would copy the module before importing it
    return subprocess.run(
        [sys.executable, "-c", code], input="y\n" * 5, capture_output=True, text=True, env=env, cwd=cwd, timeout=180
    )


def test_a_tokenizer_with_custom_code_is_never_imported(tiny_dir, adapter, tmp_path):
    marker = tmp_path / "marker.txt"
    evil = evil_tokenizer(tiny_dir, tmp_path / "evil-tokenizer", marker)
    # the attack is real: transformers on its own asks, and a "y" imports the module
    control = run_answering_yes(
        f"from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained({str(evil)!r})", tmp_path
    )
    assert "Do you wish to run the custom code?" in control.stdout + control.stderr
    assert marker.exists(), control.stderr[-2000:]
    marker.unlink()
    shutil.rmtree(tmp_path / "modules", ignore_errors=True)

    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path=str(evil)))
    code = f"""
import json, peft_softmix
from peft import PeftModel
from peft_softmix import PeftModelForSoftMixture
from transformers import AutoModelForMaskedLM
outcomes = []
for kwargs in ({{}}, {{"tokenizer": {str(evil)!r}}}):  # without and with the user's consent to that tokenizer
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        try:
            load(AutoModelForMaskedLM.from_pretrained({str(tiny_dir)!r}), {str(folder)!r}, **kwargs)
            outcomes.append("loaded")
        except Exception as err:
            outcomes.append(type(err).__name__ + ": " + str(err))
print(json.dumps(outcomes))
"""
    proc = run_answering_yes(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code?" not in proc.stdout + proc.stderr  # never asked
    assert not marker.exists()  # never imported
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    for refused in outcomes[:2]:  # without consent: refused before anything is read from that folder
        assert refused.startswith("AdapterLoadError") and str(folder / CONFIG_FILE) in refused
        assert str(evil) in refused and str(tiny_dir) in refused and "tokenizer=" in refused
    for refused in outcomes[2:]:  # with consent: still no code, a clear error naming the tokenizer
        assert refused.startswith("AdapterLoadError") and f"Cannot load the tokenizer {str(evil)!r}" in refused


def test_every_tokenizer_load_says_trust_remote_code_false(tiny_dir, adapter, tmp_path, monkeypatch):
    calls = []
    real = AutoTokenizer.from_pretrained

    def spy(name, *args, **kwargs):
        calls.append(kwargs)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(trust.AutoTokenizer, "from_pretrained", spy)
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_kwargs={"trust_remote_code": False}))
    PeftModel.from_pretrained(load_base(tiny_dir), folder)
    get_peft_model(load_base(tiny_dir), SoftMixtureConfig(templates=TEMPLATES))  # a config of the user's own
    PeftModel.from_pretrained(load_base(tiny_dir), adapter, tokenizer=str(tiny_dir))  # a tokenizer the user named
    assert len(calls) == 3 and all(call.get("trust_remote_code") is False for call in calls)


# -- options an adapter file may not pass to the tokenizer loader ----------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("token", "hf_attacker", "a download option"),
        ("use_auth_token", "hf_attacker", "a download option"),
        ("cache_dir", "/tmp/elsewhere", "a download option"),
        ("revision", "refs/pr/1", "a download option"),
        ("proxies", {"https": "http://attacker:8080"}, "a download option"),
        ("force_download", True, "a download option"),
        ("trust_remote_code", True, "run code"),
        ("mask_token", ".", "special tokens"),
        ("pad_token", "Dante", "special tokens"),
        ("additional_special_tokens", ["Florence"], "special tokens"),
        ("vocab_file", "/tmp/vocab.txt", "vocabulary"),
        ("tokenizer_file", "/tmp/tokenizer.json", "vocabulary"),
        ("some_new_option", 1, "not one of the tokenizer options"),
        ("use_fast", "yes", "takes a bool"),
        ("model_max_length", -3, "takes a int > 0"),
    ],
)
def test_tokenizer_kwargs_outside_the_allowlist_are_refused(
    tiny_dir, adapter, tmp_path, monkeypatch, key, value, says
):
    def never(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(trust.AutoTokenizer, "from_pretrained", never)
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_kwargs={key: value}))
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        with pytest.raises(AdapterLoadError) as caught:
            load(load_base(tiny_dir), folder)
        message = str(caught.value)
        assert str(folder / CONFIG_FILE) in message and repr(key) in message and says in message


def test_a_redefined_mask_token_no_longer_answers_every_query(tiny_dir, adapter, tmp_path):
    """The issue's attack: {"mask_token": "."} made "." the answer with probability 0.9999; now it is refused, and
    the honest adapter's answers are not "."."""
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_kwargs={"mask_token": "."}))
    with pytest.raises(AdapterLoadError, match="'mask_token'"):
        PeftModel.from_pretrained(load_base(tiny_dir), folder)
    honest = PeftModel.from_pretrained(load_base(tiny_dir), adapter)
    top = [item["predictions"][0] for item in honest.query(SUBJECTS)]
    assert all(p["token_str"] != "." or p["score"] < 0.99 for p in top)


def test_harmless_tokenizer_kwargs_load(tiny_dir, adapter, tmp_path):
    options = {"use_fast": True, "do_lower_case": False, "trust_remote_code": False, "model_max_length": 64}
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_kwargs=options))
    loaded = PeftModel.from_pretrained(load_base(tiny_dir), folder)
    torch.testing.assert_close(answers(loaded), answers(PeftModel.from_pretrained(load_base(tiny_dir), adapter)))


def test_a_users_own_config_with_download_options_is_refused_before_anything_is_saved(tiny_dir):
    with pytest.raises(AdapterLoadError, match=r"SoftMixtureConfig: tokenizer_kwargs sets 'token'.*HF_TOKEN"):
        get_peft_model(load_base(tiny_dir), SoftMixtureConfig(templates=TEMPLATES, tokenizer_kwargs={"token": "hf_x"}))


# -- another tokenizer than the base model's -------------------------------------------------------------------


@pytest.fixture
def tokenizer_copy(tiny_dir, tmp_path) -> Path:
    """The base model's tokenizer saved to another folder: same vocabulary, another name."""
    folder = tmp_path / "tokenizer-copy"
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(folder)
    return folder


def test_another_tokenizer_needs_consent_and_tokenizer_gives_it(tiny_dir, adapter, tmp_path, tokenizer_copy):
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path=str(tokenizer_copy)))
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        with pytest.raises(AdapterLoadError) as caught:
            load(load_base(tiny_dir), folder)
        message = str(caught.value)
        assert str(folder / CONFIG_FILE) in message
        assert repr(str(tokenizer_copy)) in message and repr(str(tiny_dir)) in message  # names both
        assert f"tokenizer={str(tokenizer_copy)!r}" in message  # and how to consent

    expected = answers(PeftModel.from_pretrained(load_base(tiny_dir), adapter))
    own = AutoTokenizer.from_pretrained(str(tokenizer_copy))
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        by_name = load(load_base(tiny_dir), folder, tokenizer=str(tokenizer_copy))
        assert by_name.tokenizer.name_or_path == str(tokenizer_copy)
        torch.testing.assert_close(answers(by_name), expected)
        by_object = load(load_base(tiny_dir), folder, tokenizer=own)
        assert by_object.tokenizer is own
        torch.testing.assert_close(answers(by_object), expected)


def test_load_adapter_needs_consent_too(tiny_dir, adapter, tmp_path, tokenizer_copy):
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path=str(tokenizer_copy)))
    model = PeftModel.from_pretrained(load_base(tiny_dir), adapter)
    with pytest.raises(AdapterLoadError, match="asks for the tokenizer"):
        model.load_adapter(folder, adapter_name="second")
    assert "second" not in model.peft_config
    model.load_adapter(folder, adapter_name="second", tokenizer=str(tokenizer_copy))
    model.set_adapter("second")
    assert model.tokenizer.name_or_path == str(tokenizer_copy)
    # the consent was for that call only
    with pytest.raises(AdapterLoadError, match="asks for the tokenizer"):
        model.load_adapter(folder, adapter_name="third")


def test_the_base_models_own_folder_under_another_spelling_needs_no_consent(tiny_dir, adapter, tmp_path):
    spelling = str(tiny_dir) + "/"
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path=spelling))
    PeftModel.from_pretrained(load_base(tiny_dir), folder)
    link = tmp_path / "same-model"
    link.symlink_to(tiny_dir)
    folder = edited(adapter, tmp_path / "b", config=lambda c: c.update(tokenizer_name_or_path=str(link)))
    PeftModel.from_pretrained(load_base(tiny_dir), folder)


def test_a_tokenizer_that_cannot_be_loaded_is_named_once_consented(tiny_dir, adapter, tmp_path):
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path="/nonexistent/tokenizer"))
    with pytest.raises(AdapterLoadError) as caught:
        PeftModel.from_pretrained(load_base(tiny_dir), folder, tokenizer="/nonexistent/tokenizer")
    assert "Cannot load the tokenizer '/nonexistent/tokenizer'" in str(caught.value)
    assert str(folder / CONFIG_FILE) in str(caught.value)


def test_a_base_built_in_memory_needs_consent_for_a_named_tokenizer(tiny_dir, adapter, tmp_path, tokenizer_copy):
    folder = edited(adapter, tmp_path, config=lambda c: c.update(tokenizer_name_or_path=str(tokenizer_copy)))
    with pytest.raises(AdapterLoadError, match="the base model has no name"):
        PeftModel.from_pretrained(tiny_bert(), folder)
    PeftModel.from_pretrained(tiny_bert(), folder, tokenizer=str(tokenizer_copy))


def test_a_users_own_config_may_name_any_tokenizer(tiny_dir, tokenizer_copy):
    config = SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=str(tokenizer_copy))
    model = get_peft_model(load_base(tiny_dir), config)
    assert model.tokenizer.name_or_path == str(tokenizer_copy)


# -- tensors: magnitude as well as finiteness ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("soft_words", lambda t: t.mul_(1e37)),
        ("soft_words", lambda t: t[0].fill_(1e6)),
        ("deep_offsets", lambda t: t.fill_(1e30)),
        ("mixture_logits", lambda t: t.copy_(torch.tensor([1e37, -1e37]))),
    ],
)
def test_finite_but_huge_tensors_are_refused_naming_the_tensor(tiny_dir, adapter, tmp_path, name, change):
    folder = edited(adapter, tmp_path, tensors=lambda tensors: change(tensors[name]))
    for load in (PeftModel.from_pretrained, PeftModelForSoftMixture.from_pretrained):
        with pytest.raises(AdapterLoadError) as caught:
            load(load_base(tiny_dir), folder)
        message = str(caught.value)
        assert f"Adapter tensor '{name}'" in message and str(folder / WEIGHTS_FILE) in message
        assert "beyond" in message


def test_large_but_sane_tensors_still_load(tiny_dir, adapter, tmp_path):
    """The bound is far above anything trained: soft words 10x longer, deep offsets of 5, logits of +-50 load."""

    def scale(tensors):
        tensors["soft_words"].mul_(10)
        tensors["deep_offsets"].fill_(5.0)
        tensors["mixture_logits"].copy_(torch.tensor([50.0, -50.0]))

    model = PeftModel.from_pretrained(load_base(tiny_dir), edited(adapter, tmp_path, tensors=scale))
    assert answers(model).isfinite().all()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mixture_logits", float("nan")),
        ("soft_words", float("inf")),
        ("deep_offsets", float("nan")),
        ("soft_words", 1e30),
    ],
)
def test_unloadable_state_is_never_saved(tiny_dir, adapter, tmp_path, name, value):
    model = PeftModelForSoftMixture.from_pretrained(load_base(tiny_dir), adapter, is_trainable=True)
    target = tmp_path / "saved"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        getattr(model.prompt_encoder["default"], name).view(-1)[0] = value
    if name == "mixture_logits":  # the case: NaN weights answer [PAD]
        assert model.query(["Dante"], top_k=1)[0]["predictions"][0]["token_str"] == "[PAD]"
    with pytest.raises(ValueError) as caught:
        model.save_pretrained(target)
    assert f"'{name}'" in str(caught.value) and "adapter 'default'" in str(caught.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the last good files are intact
    with pytest.raises(ValueError, match=f"'{name}'"):
        model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
