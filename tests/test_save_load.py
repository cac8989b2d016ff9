"""Saving an adapter, reloading it (in this process, in a fresh one, several into one base) and refusing bad files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIG, WORDS, run_python, tiny_bert
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, BertTokenizerFast
from yaml import safe_load

from peft_softmix import AdapterLoadError, PeftModelForSoftMixture, SoftMixtureConfig

ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
SUBJECTS = ["Dante", "Indias", "Ali-Bo"]
FACTS = [("Dante", "Florence"), ("Ali", "Rome"), ("Bo", "Paris"), ("Cy", "Berlin")]


def trained(base, templates, deep=False, steps=4, seed=0, **kwargs) -> PeftModelForSoftMixture:
    """An adapter moved away from its init (else a loader that ignores the weights file would pass)."""
    pm = get_peft_model(base, SoftMixtureConfig(templates=templates, deep=deep, **kwargs))
    torch.manual_seed(seed)
    batch = pm.encode(*zip(*FACTS))
    optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        pm(**batch).loss.backward()
        optimizer.step()
    return pm.eval()


@torch.no_grad()
def log_probs(pm, subjects=SUBJECTS) -> torch.Tensor:
    return pm(**pm.encode(subjects)).log_probs


def fresh(tiny_dir):
    return AutoModelForMaskedLM.from_pretrained(str(tiny_dir))


@pytest.fixture
def saved(base, tmp_path):
    templates = ["[X] was born in [Y] .", "[Y] is the city of [X] .", "the capital of [X] is [Y]"]
    pm = trained(base, templates, deep=True, template_weights=[1.0, 2.0, 3.0])
    pm.save_pretrained(tmp_path / "adapter")
    return pm, tmp_path / "adapter"


def test_saved_files_hold_exactly_the_adapter(saved):
    pm, path = saved
    assert {p.name for p in path.iterdir()} == ADAPTER_FILES
    tensors = load_file(path / "adapter_model.safetensors")
    encoder = pm.prompt_encoder["default"]
    assert tensors.keys() == {"soft_words", "mixture_logits", "deep_offsets"}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, getattr(encoder, name).detach()), name
    n_floats = sum(t.numel() for t in tensors.values())
    assert (path / "adapter_model.safetensors").stat().st_size < 4 * n_floats + 1024  # nothing else rides along
    assert n_floats < sum(p.numel() for p in pm.base_model.parameters()) // 10

    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SOFT_MIXTURE" and config["task_type"] == "SOFT_MIXTURE"
    assert config["templates"] == pm.peft_config["default"].templates
    assert config["num_deep_layers"] == 2 and config["vocab_size"] == len(WORDS) and config["token_dim"] == 32
    tokenizer = pm.tokenizer
    for template, segments in zip(config["templates"], config["template_token_ids"]):
        words = template.replace("[X]", " ").replace("[Y]", " ")
        assert [t for seg in segments for t in seg] == tokenizer(words, add_special_tokens=False)["input_ids"]
    assert config["template_token_ids"][1][0] == []  # "[Y] is the city of [X] ." has nothing before [Y]
    assert sum(len(s) for t in config["template_token_ids"] for s in t) == tensors["soft_words"].shape[0]

    card = (path / "README.md").read_text()
    assert "import peft_softmix" in card
    front_matter = safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "peft"
    assert {"peft_softmix", "soft-prompts", "fill-mask"} <= set(front_matter["tags"])
    assert all(f"`{t}`" in card for t in config["templates"])


def test_shallow_adapter_has_no_deep_tensor(base, tmp_path):
    pm = trained(base, ["[X] is from [Y] ."])
    pm.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == {"soft_words", "mixture_logits"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_deep_layers"] == 0


def test_reload_in_a_fresh_process(saved, tiny_dir):
    pm, path = saved
    expected = log_probs(pm)
    code = f"""
import json, torch
import peft_softmix
from peft import PeftModel
from transformers import AutoModelForMaskedLM
base = AutoModelForMaskedLM.from_pretrained({str(tiny_dir)!r})
model = PeftModel.from_pretrained(base, {str(path)!r})
with torch.no_grad():
    out = model(**model.encode({SUBJECTS!r}))
print(json.dumps({{"type": type(model).__name__, "log_probs": out.log_probs.tolist(),
                  "weights": model.mixture_weights(), "training": model.training}}))
"""
    result = run_python(code)
    assert result["type"] == "PeftModelForSoftMixture"
    assert result["training"] is False
    torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=1e-6, rtol=0)
    assert result["weights"] == pytest.approx(pm.mixture_weights(), abs=1e-7)


def test_reload_in_process_and_resume(saved, tiny_dir):
    pm, path = saved
    frozen = PeftModel.from_pretrained(fresh(tiny_dir), path)
    torch.testing.assert_close(log_probs(frozen), log_probs(pm), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in frozen.parameters())
    resumed = PeftModelForSoftMixture.from_pretrained(fresh(tiny_dir), path, is_trainable=True)
    trainable = {name for name, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_encoder.default.{n}" for n in ("soft_words", "mixture_logits", "deep_offsets")}


def test_load_adapter_trainable_and_set_requires_grad(saved, tiny_dir):
    pm, path = saved
    model = PeftModel.from_pretrained(fresh(tiny_dir), path)
    model.load_adapter(path, adapter_name="again", is_trainable=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_encoder.again.{n}" for n in ("soft_words", "mixture_logits", "deep_offsets")}
    model.set_requires_grad("again", requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_requires_grad(["default"])
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        f"prompt_encoder.default.{n}" for n in ("soft_words", "mixture_logits", "deep_offsets")
    }


def test_save_again_overwrites(saved, tiny_dir):
    pm, path = saved
    with torch.no_grad():
        pm.prompt_encoder["default"].mixture_logits.zero_()
    pm.save_pretrained(path)
    assert {p.name for p in path.iterdir()} == ADAPTER_FILES
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no staging folder left
    reloaded = PeftModel.from_pretrained(fresh(tiny_dir), path)
    assert reloaded.mixture_weights() == pytest.approx([1 / 3] * 3)


def test_several_adapters_in_one_base(base, tiny_dir, tmp_path):
    relations = {
        "born": (["[X] was born in [Y] .", "[X] , born in [Y] ."], False),
        "capital": (["the capital of [X] is [Y]", "[Y] is the city of [X] .", "[X] ' s capital , [Y]"], True),
        "language": (["[X] speaks [Y] .", "the native language of [X] is [Y] .", "[X] - [Y]", "[Y] ( [X] )"], 1),
    }
    alone = {}
    for seed, (name, (templates, deep)) in enumerate(relations.items()):
        pm = trained(fresh(tiny_dir), templates, deep=deep, seed=seed)
        pm.save_pretrained(tmp_path / name)
        alone[name] = log_probs(pm)

    names = list(relations)
    multi = PeftModel.from_pretrained(base, tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        multi.load_adapter(tmp_path / name, adapter_name=name)
    assert set(multi.peft_config) == set(names)
    for name in [*names, names[0], names[2]]:  # switch back and forth
        multi.set_adapter(name)
        assert multi.active_adapter == name
        assert len(multi.mixture_weights()) == len(relations[name][0])
        torch.testing.assert_close(log_probs(multi), alone[name], atol=1e-6, rtol=0)
        first = multi.query(["Dante"], top_k=1, return_template_probs=True)[0]["templates"][0]
        assert first["template"] == relations[name][0][0]
    # a batch encoded for one adapter is refused by another with a different K
    multi.set_adapter("born")
    batch = multi.encode(["Dante"])
    multi.set_adapter("language")
    with pytest.raises(ValueError, match="encode it with this adapter active"):
        multi(**batch)


# -- adapters that do not fit -------------------------------------------------------------------------------


def test_other_hidden_size_is_refused(saved):
    _, path = saved
    other = tiny_bert(**{**TINY_CONFIG, "hidden_size": 16, "intermediate_size": 32})
    with pytest.raises(AdapterLoadError, match=r"\b32\b.*\b16\b") as info:
        PeftModel.from_pretrained(other, path)
    assert str(path) in str(info.value) and "base model" in str(info.value)


def test_other_vocabulary_is_refused(saved):
    _, path = saved
    other = tiny_bert(vocab_size=len(WORDS) + 7)
    with pytest.raises(AdapterLoadError, match=rf"vocabulary.*\b{len(WORDS)}\b.*\b{len(WORDS) + 7}\b") as info:
        PeftModel.from_pretrained(other, path)
    assert str(path) in str(info.value) and "base model" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_weights_file_is_named(saved, tiny_dir, damage):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(AdapterLoadError, match="truncated or corrupted") as info:
        PeftModel.from_pretrained(fresh(tiny_dir), path)
    assert str(weights) in str(info.value)


def test_weights_of_another_adapter_are_refused(saved, tiny_dir):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "soft_words": tensors["soft_words"][:-1].contiguous()}, weights)
    with pytest.raises(AdapterLoadError, match="'soft_words' has shape"):
        PeftModel.from_pretrained(fresh(tiny_dir), path)
    save_file({k: v for k, v in tensors.items() if k != "deep_offsets"}, weights)
    with pytest.raises(AdapterLoadError, match=r"missing \['deep_offsets'\]"):
        PeftModel.from_pretrained(fresh(tiny_dir), path)
    save_file({**tensors, "soft_words": torch.full_like(tensors["soft_words"], float("nan"))}, weights)
    with pytest.raises(AdapterLoadError, match="NaN"):
        PeftModel.from_pretrained(fresh(tiny_dir), path)


def test_tokenizer_that_splits_templates_differently_is_refused(saved, tiny_dir, tmp_path):
    _, path = saved
    # same size, but "capital" is no longer one token
    words = [w if w != "capital" else "capitol" for w in WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False).save_pretrained(tmp_path / "tok")
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_name_or_path"] = str(tmp_path / "tok")
    config_file.write_text(json.dumps(config))
    # with the user's consent to that tokenizer: without it, it is never loaded (tests/test_adapter_trust.py)
    with pytest.raises(AdapterLoadError, match="tokeni[sz]") as info:
        PeftModel.from_pretrained(fresh(tiny_dir), path, tokenizer=str(tmp_path / "tok"))
    assert "'the capital of [X] is [Y]'" in str(info.value)  # names the template that moved
