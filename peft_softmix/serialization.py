"""Saving and loading a mixture of soft prompts: adapter files, the Hub, the model card, and the checks on them.

`AdapterFilesMixin` gives `PeftModelForSoftMixture` its `save_pretrained` (atomic, safetensors only),
`load_adapter` / `from_pretrained` (``is_trainable`` resumes training; broken files fail naming the file, nothing is
loaded halfway, a pickle is never read), `push_to_hub` and the model card. Errors about the content of
``adapter_config.json`` are worded in `config.py` (`SoftMixtureConfig.from_json_file`, `naming_config_file`).
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, cast

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn
from transformers import PreTrainedTokenizerBase

from .atomic import atomic_folder
from .config import SoftMixtureConfig
from .errors import AdapterLoadError
from .model import SoftMixtureModel
from .trust import tokenizer_consent

if TYPE_CHECKING:
    from peft import PeftModel as _Base
else:
    _Base = object

__all__ = ["AdapterFilesMixin", "check_adapter_fits"]

MODEL_CARD_TAGS = ["peft", "peft_softmix", "soft-prompts", "mixture-of-soft-prompts", "fill-mask", "lama"]


class AdapterFilesMixin(_Base):
    """Save / load / Hub / model card for `PeftModelForSoftMixture` (which inherits it before `PeftModel`)."""

    if TYPE_CHECKING:
        # provided by PeftModelForSoftMixture

        def _make_trainable(self, adapter_name: str) -> None: ...

        def _forget_adapter(self, adapter_name: str) -> None: ...

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:  # type: ignore[override]
        """Save the adapter files atomically: a crash mid-save leaves the previous files intact."""
        if not kwargs.get("is_main_process", True):
            return
        if kwargs.get("safe_serialization") is False:
            raise ValueError(
                "peft_softmix saves adapters only as safetensors, and loads only those (a pickled adapter_model.bin "
                "can run code when loaded); drop safe_serialization=False."
            )
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory.")
        for name in kwargs.get("selected_adapters") or list(self.peft_config):
            # never write a file the loader would refuse
            cast(SoftMixtureModel, self.prompt_encoder[name]).check_savable(name)
        with atomic_folder(save_directory) as staging:
            super().save_pretrained(os.fspath(staging), **kwargs)

    def load_adapter(  # type: ignore[override]
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *args: Any, **kwargs: Any
    ):
        """Like `PeftModel.load_adapter`; ``is_trainable=True`` loads the adapter ready to train further.

        ``tokenizer=`` (a name, folder or tokenizer object) is the user's consent to a tokenizer other than the
        base model's, which the adapter's config may name but not choose (see peft_softmix.trust).
        """
        consent = kwargs.pop("tokenizer", None)
        folder = os.fspath(model_id)
        if kwargs.get("subfolder"):
            folder = os.path.join(folder, kwargs["subfolder"])
        weights_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        added = adapter_name not in self.peft_config
        _check_adapter_files(os.fspath(model_id), folder, read_config=added, **kwargs)
        try:
            # PEFT refuses is_trainable for prompt-learning methods; ours resumes fine, so it is applied after loading
            with tokenizer_consent(consent):
                result = super().load_adapter(model_id, adapter_name, False, *args, **kwargs)
        except Exception as err:
            if added:  # never leave behind an adapter whose weights did not load
                self._forget_adapter(adapter_name)
            if isinstance(err, AdapterLoadError):
                if folder in str(err):
                    raise
                raise AdapterLoadError(f"{weights_file}: {err}") from None
            if "safetensors" in type(err).__module__ or "Safetensor" in type(err).__name__ or "deserializ" in str(err):
                raise AdapterLoadError(
                    f"{weights_file} cannot be read ({err}); the file is truncated or corrupted. Save the adapter "
                    "again or download it afresh."
                ) from None
            raise
        if is_trainable:
            self._make_trainable(adapter_name)
        return result

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ):
        """Like `PeftModel.from_pretrained`, and ``is_trainable=True`` resumes training the adapter.

        ``tokenizer=`` (a name, folder or tokenizer object) is the user's consent to a tokenizer other than the
        base model's, which the adapter's config may name but not choose (see peft_softmix.trust).
        """
        folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else os.fspath(model_id)
        _check_adapter_files(os.fspath(model_id), folder, read_config=kwargs.get("config") is None, **kwargs)
        with tokenizer_consent(kwargs.pop("tokenizer", None)):
            peft_model = super().from_pretrained(model, model_id, adapter_name, is_trainable=False, **kwargs)
        if is_trainable:
            peft_model._make_trainable(adapter_name)  # type: ignore[attr-defined]
        return peft_model

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        max_shard_size: Any = None,
    ) -> Any:
        """Upload the adapter files that `save_pretrained` writes (weights, config, model card) to a Hub repo.

        transformers' `push_to_hub` would replace our model card with a generic one that neither says
        `import peft_softmix` nor carries the tags. ``max_shard_size`` is accepted and ignored: the adapter is tiny.
        """
        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir)
            if tags:
                card = ModelCard.load(os.path.join(tmp_dir, "README.md"))
                card.data.tags = sorted(set(card.data.tags or []) | set(tags))
                card.save(os.path.join(tmp_dir, "README.md"))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp_dir, name))
                for name in sorted(os.listdir(tmp_dir))
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or "Upload soft-prompt mixture adapter",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    def _get_peft_specific_model_tags(self) -> list[str]:
        return list(MODEL_CARD_TAGS)

    def create_or_update_model_card(self, output_dir: str) -> None:
        super().create_or_update_model_card(output_dir)
        path = os.path.join(output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if "import peft_softmix" in card:
            return
        config = self.active_peft_config
        templates = "\n".join(f"- `{t}`" for t in config.templates)
        usage = f"""
## Using this adapter

A mixture of {len(config.templates)} soft prompts (Qin & Eisner, NAACL 2021) for a frozen masked LM, made with
[peft_softmix](https://pypi.org/project/peft-softmix/). Import `peft_softmix` first: it registers the method with PEFT.

```python
import peft_softmix  # registers SOFT_MIXTURE with PEFT
from peft import PeftModel
from transformers import AutoModelForMaskedLM

base = AutoModelForMaskedLM.from_pretrained("{config.base_model_name_or_path}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
print(model.query(["Dante"], top_k=5))
```

Templates (deep prompts: {bool(config.num_deep_layers)}):
{templates}
"""
        # written into save_pretrained's staging folder, which is published as a whole
        with open(path, "w", encoding="utf-8") as f:
            f.write(card.rstrip() + "\n" + usage)


def check_adapter_fits(
    config: SoftMixtureConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: list[list[list[int]]],
    embeddings: nn.Embedding,
) -> None:
    """Refuse an adapter (``config``, saved or new) on a base model or tokenizer it was not made for.

    ``token_ids`` is how ``tokenizer`` lays out the templates now; a saved adapter's `template_token_ids` must match.
    """
    model_name = type(model).__name__
    base_name = getattr(getattr(model, "config", None), "name_or_path", "") or "unnamed"
    trained_for = (
        f"the base model {config.base_model_name_or_path or 'unnamed'!r} (vocabulary {config.vocab_size}, "
        f"embedding width {config.token_dim})"
    )
    given = (
        f"{model_name} {base_name!r} (vocabulary {embeddings.num_embeddings}, embedding width "
        f"{embeddings.embedding_dim})"
    )
    if (config.vocab_size is not None and config.vocab_size != embeddings.num_embeddings) or (
        config.token_dim is not None and config.token_dim != embeddings.embedding_dim
    ):
        raise AdapterLoadError(
            f"This adapter was trained for {trained_for} but is being applied to {given}. Load it on the base "
            "model it was trained for."
        )
    if config.template_token_ids is not None and config.template_token_ids != token_ids:
        saved, now = config.template_token_ids, token_ids
        k = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
        template = config.templates[k] if k < len(config.templates) else None
        raise AdapterLoadError(
            f"Template {k} {template!r} was tokenised as {saved[k] if k < len(saved) else None} when this adapter "
            f"was trained (with a {config.tokenizer_class}), but as {now[k] if k < len(now) else None} by the "
            f"tokenizer {type(tokenizer).__name__} {tokenizer.name_or_path!r}: either the templates were edited "
            "after training or this is another tokenizer, and the soft words would land on the wrong tokens. "
            "Restore the trained templates and use the base model's own tokenizer."
        )
    if len(tokenizer) > embeddings.num_embeddings:
        raise AdapterLoadError(
            f"The tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but {model_name}'s embedding "
            f"table only {embeddings.num_embeddings}: they do not belong together."
        )


def _check_adapter_files(model_id: str, folder: str, read_config: bool, **kwargs: Any) -> None:
    """Fail early, naming the file, where PEFT would raise an unexplained error or fall back to a pickle."""
    weights_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isdir(folder):
        config_file = os.path.join(folder, CONFIG_NAME)
        if read_config and os.path.isfile(config_file):
            # PEFT parses the file first (to find its peft_type) and reports bad JSON without its name
            SoftMixtureConfig.from_json_file(config_file)
        if not os.path.isfile(weights_file):
            pickled = os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
            raise AdapterLoadError(
                f"{weights_file} is missing"
                + (
                    f" (there is an {WEIGHTS_NAME}, which peft_softmix never loads: pickle files can run code)"
                    if pickled
                    else ""
                )
                + ". Save the adapter again with save_pretrained, which writes safetensors."
            )
        return
    # A Hub id: fetch the safetensors file first, so that PEFT never falls back to a pickled adapter_model.bin.
    hub_kwargs = {
        key: kwargs[key]
        for key in ("subfolder", "revision", "cache_dir", "token", "local_files_only")
        if kwargs.get(key) is not None
    }
    try:
        hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
    except Exception as err:
        raise AdapterLoadError(
            f"{model_id!r} is neither a local adapter folder nor a Hub repository with {SAFETENSORS_WEIGHTS_NAME} "
            f"({type(err).__name__}: {err}). peft_softmix loads adapters only from safetensors, never from a pickled "
            f"{WEIGHTS_NAME}."
        ) from err
