"""Registration with PEFT: the tested version range, errors naming the file on our own load path, and PEFT's own
loading left exactly as it is for every other method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_bert
from peft import LoraConfig, PeftModel

import peft_softmix
from peft_softmix import AdapterLoadError, PeftModelForSoftMixture, registration

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_untested_peft_version_is_refused_with_the_range(monkeypatch):
    monkeypatch.setattr(registration, "version", lambda name: "0.22.0")
    with pytest.raises(ImportError, match=r"peft>=0\.21\.0,<0\.22\.0.*0\.22\.0 is installed"):
        registration.register()


def test_moved_peft_internals_are_named(monkeypatch):
    import peft.mapping

    monkeypatch.delattr(peft.mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(ImportError, match="adapter registries, which moved"):
        registration.register()


def test_register_twice_is_harmless():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_softmix.register()
    peft_softmix.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_softmix.PEFT_TYPE] is peft_softmix.SoftMixtureConfig


def test_peft_config_reader_is_peft_own():
    from peft.config import PeftConfigMixin

    reader = PeftConfigMixin.__dict__["_get_peft_type"]
    assert isinstance(reader, classmethod)
    assert reader.__func__.__module__ == "peft.config"
    assert not hasattr(reader.__func__, "__wrapped__")


BROKEN_CONFIGS = [
    ("{not json", "is not valid JSON", json.JSONDecodeError),
    ('{"templates": []}', "lacks ['peft_type'", KeyError),
]


@pytest.mark.parametrize(("text", "problem", "peft_error"), BROKEN_CONFIGS)
def test_our_from_pretrained_names_a_broken_config_file(tmp_path, text, problem, peft_error):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterLoadError) as info:
        PeftModelForSoftMixture.from_pretrained(tiny_bert(), tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(info.value)
    assert problem in str(info.value)
    # PEFT's generic entry point parses the file in PEFT's own code first: PEFT's own error, untouched
    with pytest.raises(peft_error):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


LOAD_BEFORE_AND_AFTER = """
import json, sys
from peft import PeftModel
from peft.config import PeftConfigMixin
from transformers import BertConfig, BertForMaskedLM

def attempt(folder):
    base = BertForMaskedLM(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                      intermediate_size=8))
    try:
        PeftModel.from_pretrained(base, folder)
    except Exception as err:
        return [type(err).__module__, type(err).__qualname__, str(err)]
    return None

reader = PeftConfigMixin.__dict__["_get_peft_type"]
before = [attempt(folder) for folder in sys.argv[1:]]
import peft_softmix
after = [attempt(folder) for folder in sys.argv[1:]]
print(json.dumps({"same_reader": PeftConfigMixin.__dict__["_get_peft_type"] is reader, "before": before,
                  "after": after}))
"""


def test_import_leaves_other_methods_loading_errors_unchanged(tmp_path):
    """A broken LoRA adapter_config.json gives exactly the same error with and without peft_softmix imported."""
    folders = []
    for name, mutate in {
        "truncated": lambda text: text[: len(text) // 2],
        "no-peft-type": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "peft_type"}),
        "json-list": lambda text: "[1, 2]",
    }.items():
        folder = tmp_path / name
        LoraConfig(target_modules=["query"]).save_pretrained(folder)
        config_file = folder / "adapter_config.json"
        config_file.write_text(mutate(config_file.read_text()))
        folders.append(str(folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_BEFORE_AND_AFTER, *folders], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_reader"]
    assert all(error is not None for error in result["before"])  # every broken file does fail
    assert result["after"] == result["before"]
    assert result["before"][0][:2] == ["json.decoder", "JSONDecodeError"]


def test_peft_type_is_a_str_enum_member_that_peft_can_read():
    """PEFT reads ``peft_type.value`` (model card checks, error messages) and keys its registries by the type."""

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    config = peft_softmix.SoftMixtureConfig(templates=["[X] was born in [Y] ."])
    assert config.peft_type is peft_softmix.SoftMixtureType.SOFT_MIXTURE
    assert config.peft_type.value == "SOFT_MIXTURE" and config.peft_type == "SOFT_MIXTURE"
    assert f"{config.peft_type}" == str(config.peft_type) == "SOFT_MIXTURE"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SOFT_MIXTURE"] is peft_softmix.SoftMixtureConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type] is peft_softmix.SoftMixtureModel
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "SOFT_MIXTURE"
