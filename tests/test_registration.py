"""Registration with PEFT: the tested version range, and errors from PEFT's own entry point naming the file."""

from __future__ import annotations

import pytest
from conftest import tiny_bert
from peft import PeftModel

import peft_softmix
from peft_softmix import registration


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
    from peft.config import PeftConfig

    peft_softmix.register()
    peft_softmix.register()
    assert getattr(PeftConfig._get_peft_type, "_peft_softmix_wrapped", False)


@pytest.mark.parametrize(
    ("text", "problem"), [("{not json", "is not valid JSON"), ('{"templates": []}', "has no 'peft_type'")]
)
def test_peft_from_pretrained_names_a_broken_config_file(tmp_path, text, problem):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(info.value)
