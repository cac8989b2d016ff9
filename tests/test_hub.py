"""Loading by Hub id (from a pre-filled offline cache) and pushing to the Hub (at the network boundary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_python
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl
from peft import get_peft_model
from yaml import safe_load

from peft_softmix import SoftMixtureConfig

BASE_ID, ADAPTER_ID = "org/tiny-bert", "org/tiny-softmix"
SUBJECTS = ["Dante", "Indias"]
TEMPLATES = ["[X] was born in [Y] .", "[Y] is the city of [X] ."]


def add_to_cache(hub_cache: Path, repo_id: str, folder: Path, revision: str) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded model repo at ``revision`` (main)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture
def adapter(base, tmp_path):
    pm = get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES, deep=True, template_weights=[2.0, 1.0]))
    with torch.no_grad():  # move away from the init, so that ignoring the weights file would show
        pm.prompt_encoder["default"].soft_words.add_(0.1 * torch.randn_like(pm.prompt_encoder["default"].soft_words))
        pm.prompt_encoder["default"].deep_offsets.normal_(0, 0.1)
    return pm.eval()


def test_load_base_and_adapter_by_hub_id_offline(adapter, tiny_dir, tmp_path):
    adapter.save_pretrained(tmp_path / "adapter")
    # as if it had been trained on the Hub checkpoint: the base and its tokenizer are named by Hub id
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(base_model_name_or_path=BASE_ID, tokenizer_name_or_path=None)
    config_file.write_text(json.dumps(config))

    hf_home = tmp_path / "hf_home"
    add_to_cache(hf_home / "hub", BASE_ID, tiny_dir, "a" * 40)
    add_to_cache(hf_home / "hub", ADAPTER_ID, tmp_path / "adapter", "b" * 40)
    with torch.no_grad():
        expected = adapter(**adapter.encode(SUBJECTS)).log_probs

    code = f"""
import json, torch
import peft_softmix
from peft import PeftModel
from transformers import AutoModelForMaskedLM
base = AutoModelForMaskedLM.from_pretrained({BASE_ID!r})
model = PeftModel.from_pretrained(base, {ADAPTER_ID!r})
with torch.no_grad():
    out = model(**model.encode({SUBJECTS!r}))
print(json.dumps({{"type": type(model).__name__, "log_probs": out.log_probs.tolist(),
                  "tokenizer": model.tokenizer.name_or_path, "base": base.name_or_path}}))
"""
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN"):
        env[name] = ""
    result = run_python(code, env={**env, "HF_HUB_CACHE": str(hf_home / "hub")})
    assert result["type"] == "PeftModelForSoftMixture"
    assert result["base"] == BASE_ID and result["tokenizer"] == BASE_ID
    torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=1e-6, rtol=0)


def test_push_to_hub_uploads_only_the_adapter(adapter, monkeypatch):
    """transformers' PushToHubMixin calls HfApi.create_repo, then HfApi.create_commit; record both, send nothing."""
    uploads: dict[str, bytes] = {}
    repos: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        assert repo_id == ADAPTER_ID
        for op in operations:
            source = op.path_or_fileobj
            uploads[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        return "commit"

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"unexpected Hub call {args} {kwargs}")

    for name in ("upload_folder", "upload_file", "create_branch", "model_info", "list_repo_files"):
        monkeypatch.setattr(HfApi, name, no_network)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # any download attempt fails fast

    adapter.push_to_hub(ADAPTER_ID, tags=["my-tag"])
    assert repos == [ADAPTER_ID]
    assert set(uploads) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert len(uploads["adapter_model.safetensors"]) < 16_000
    assert json.loads(uploads["adapter_config.json"])["templates"] == TEMPLATES
    card = uploads["README.md"].decode()
    assert "import peft_softmix" in card
    front_matter = safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "peft"
    assert {"peft_softmix", "my-tag"} <= set(front_matter["tags"])
