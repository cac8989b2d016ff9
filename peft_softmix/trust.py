"""What an adapter file may make the loader do.

An adapter from the Hub is untrusted input: its ``adapter_config.json`` and ``adapter_model.safetensors`` were written
by someone else. This module holds the rules that keep such files from steering the loader:

- no code runs: every tokenizer loaded on an adapter's behalf gets ``trust_remote_code=False`` explicitly (left
  unset, transformers would *ask* the user, and a "y" would import the repository's module);
- ``tokenizer_kwargs`` may only hold a short list of harmless options, never download options (``token``,
  ``revision``, ``proxies``, ...) nor special tokens or vocabulary files (``mask_token``, ...);
- a loaded adapter gets the base model's own tokenizer; one that names another needs the user's consent
  (``tokenizer=`` when loading);
- tensors must be finite and of a sane magnitude, measured against the base model's embedding table, when loaded
  and when saved (a file the loader would refuse is never written).

docs/reliability.md ("Trust model") lists what is refused and why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import AdapterLoadError

# The options an adapter file may pass to `AutoTokenizer.from_pretrained`, with the types they take: they change how
# text is split, never where the tokenizer comes from, which code runs, or which tokens are special.
ALLOWED_TOKENIZER_KWARGS: dict[str, tuple[type, ...]] = {
    "use_fast": (bool,),
    "do_lower_case": (bool,),
    "strip_accents": (bool, type(None)),
    "add_prefix_space": (bool,),
    "model_max_length": (int,),  # can only lower the query-length limit
}
# Where and how files are fetched: an adapter must not redirect the download, name a proxy or a credential.
DOWNLOAD_KWARGS = frozenset(
    {
        "token", "use_auth_token", "cache_dir", "revision", "proxies", "force_download", "resume_download",
        "local_files_only", "subfolder", "mirror", "endpoint", "user_agent", "_commit_hash", "from_pipeline",
        "from_auto_class", "_from_auto", "gguf_file", "code_revision",
    }
)  # fmt: skip
# What defines the vocabulary: an edited mask token turns every answer into that token.
VOCABULARY_KWARGS = frozenset(
    {
        "vocab", "merges", "vocab_file", "merges_file", "tokenizer_file", "tokenizer_object", "tokenizer_type",
        "tokenizer_class", "added_tokens_decoder", "auto_map", "name_or_path", "pretrained_model_name_or_path",
        "split_special_tokens",
    }
)  # fmt: skip

# Loaded soft words and deep offsets may be at most this many times as long as the longest row of the base model's
# embedding table (at least 1): trained ones stay within a few times it, edited ones (x 1e37) overflow to NaN.
MAX_NORM_RATIO = 1e4
# |mixture logit| beyond this is never trained (a weight ratio of e^10000) and only makes the softmax overflow.
MAX_ABS_LOGIT = 1e4

Consent = str | os.PathLike | PreTrainedTokenizerBase
_pending_consent: ContextVar[Consent | None] = ContextVar("softmix_tokenizer_consent", default=None)


# -- tokenizer options -----------------------------------------------------------------------------------------


def tokenizer_load_kwargs(tokenizer_kwargs: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """The keyword arguments for `AutoTokenizer.from_pretrained` on behalf of the config read from ``source``.

    Every key is checked against `ALLOWED_TOKENIZER_KWARGS`; ``trust_remote_code`` is always ``False`` (an explicit
    ``false`` in the file is accepted, ``true`` refused).

    Raises:
        AdapterLoadError: naming ``source`` and the key, for any other option.
    """
    if tokenizer_kwargs is None:
        tokenizer_kwargs = {}
    if not isinstance(tokenizer_kwargs, Mapping):
        raise AdapterLoadError(
            f"{source}: tokenizer_kwargs must be an object of tokenizer options, got "
            f"{type(tokenizer_kwargs).__name__} {tokenizer_kwargs!r}."
        )
    allowed = ", ".join(sorted(ALLOWED_TOKENIZER_KWARGS))
    kwargs: dict[str, Any] = {}
    for key, value in tokenizer_kwargs.items():
        if key == "trust_remote_code" and value is False:
            continue
        why = _refusal(str(key), value)
        if why is not None:
            raise AdapterLoadError(
                f"{source}: tokenizer_kwargs sets {key!r}, {why} Remove it from tokenizer_kwargs; the options an "
                f"adapter may set are: {allowed}."
            )
        kwargs[key] = value
    kwargs["trust_remote_code"] = False
    return kwargs


def _refusal(key: str, value: Any) -> str | None:
    """Why an adapter may not pass ``key=value`` to the tokenizer loader (None: it may)."""
    if key == "trust_remote_code":
        return "which would run code from the tokenizer's repository: an adapter never runs code."
    if key in DOWNLOAD_KWARGS:
        return (
            "a download option: an adapter file may not choose where or how the tokenizer is fetched (credentials "
            "come from `hf auth login` or HF_TOKEN, a pinned tokenizer from a local folder passed as tokenizer=)."
        )
    if key in VOCABULARY_KWARGS or key.endswith("_token") or key.endswith("_tokens"):
        return (
            "which redefines the tokenizer's vocabulary or special tokens (an edited mask_token makes every answer "
            "that token): the base model's tokenizer is used as it was saved."
        )
    types = ALLOWED_TOKENIZER_KWARGS.get(key)
    if types is None:
        return "which is not one of the tokenizer options an adapter file may set."
    bad_count = int in types and (isinstance(value, bool) or not isinstance(value, int) or value <= 0)
    if not isinstance(value, types) or bad_count:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        return f"to {value!r}, but it takes a {names}{' > 0' if int in types else ''}."
    return None


# -- which tokenizer -------------------------------------------------------------------------------------------


@contextmanager
def tokenizer_consent(tokenizer: Consent | None) -> Iterator[None]:
    """Within this block an adapter being loaded uses ``tokenizer`` (the user's choice) if it names another one."""
    if tokenizer is None:  # a nested load without tokenizer= keeps the consent given around it
        yield
        return
    token = _pending_consent.set(tokenizer)
    try:
        yield
    finally:
        _pending_consent.reset(token)


def same_source(a: str, b: str) -> bool:
    """Whether two tokenizer/model names denote the same thing: equal, or the same local folder."""
    if a.rstrip("/\\") == b.rstrip("/\\"):
        return True
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def base_model_name(base_model: Any) -> str:
    """The name or path the base model was loaded from ("" for a model built in memory)."""
    name = getattr(getattr(base_model, "config", None), "name_or_path", "") or ""
    return name or base_model.__dict__.get("name_or_path") or ""


def load_tokenizer(config: Any, base_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of an adapter config on the base model named ``base_name``.

    A config built in Python is the user's own: its ``tokenizer_name_or_path`` (or base model) is loaded. A config
    read from a file (it has ``_source_file``) gets the base model's tokenizer; if it names another, the user must
    consent by passing ``tokenizer=`` (a name, a folder or a tokenizer object) when loading. Either way no code
    runs and only `ALLOWED_TOKENIZER_KWARGS` pass.
    """
    source = getattr(config, "_source_file", None)
    kwargs = tokenizer_load_kwargs(config.tokenizer_kwargs, source or "SoftMixtureConfig")
    consent = getattr(config, "_tokenizer_consent", None) or _pending_consent.get()
    if isinstance(consent, PreTrainedTokenizerBase):
        return consent
    asked = config.tokenizer_name_or_path
    if consent is not None:
        name = os.fspath(consent)
    elif source is None:
        name = asked or config.base_model_name_or_path
    elif asked and base_name and not same_source(asked, base_name):
        raise AdapterLoadError(
            f"{source} asks for the tokenizer {asked!r}, but the base model is {base_name!r}. An adapter file may "
            "not choose another tokenizer than its base model's (it could redefine the mask token or make the "
            f"loader fetch another repository). If you trust it, pass it yourself: "
            f"PeftModel.from_pretrained(base, adapter, tokenizer={asked!r}) (or load_adapter(..., tokenizer=...))."
        )
    elif asked and not base_name:
        raise AdapterLoadError(
            f"{source} asks for the tokenizer {asked!r}, and the base model has no name to check it against (it was "
            "not loaded with from_pretrained). Pass the base model's tokenizer yourself: "
            f"PeftModel.from_pretrained(base, adapter, tokenizer=...), e.g. tokenizer={asked!r} if you trust it."
        )
    else:
        # the base model's own tokenizer; a base built in memory has no name, and then the one the adapter was
        # trained on stands in (still without code or download options)
        name = base_name or config.base_model_name_or_path
    if not name:
        raise ValueError(
            "SoftMixtureConfig needs tokenizer_name_or_path (the base model's tokenizer) when the base model was "
            "not loaded with from_pretrained."
        )
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Cannot load the tokenizer {name!r} ({err}). Set tokenizer_name_or_path (in adapter_config.json for "
            "a saved adapter) to the base model's tokenizer folder or Hub id."
        ) from err


# -- tensors ---------------------------------------------------------------------------------------------------


def embedding_norm_bound(table: torch.Tensor) -> float:
    """The longest row a soft word or deep offset may have: `MAX_NORM_RATIO` times the table's longest (>= 1)."""
    if table.device.type == "meta" or table.numel() == 0:
        return float("inf")
    longest = float(torch.linalg.vector_norm(table.detach(), dim=-1, dtype=torch.float32).max())
    return MAX_NORM_RATIO * (max(longest, 1.0) if math.isfinite(longest) else 1.0)


def tensor_problem(name: str, value: torch.Tensor, norm_bound: float) -> str | None:
    """What makes adapter tensor ``name`` unusable (NaN/inf, or beyond the magnitude bounds), or None."""
    value = value.detach()
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        return f"Adapter tensor '{name}' contains NaN or inf values ({bad} of {value.numel()})"
    if value.numel() == 0:
        return None
    if name == "mixture_logits":
        largest = float(value.float().abs().max())
        if largest > MAX_ABS_LOGIT:
            return f"Adapter tensor '{name}' holds a logit of magnitude {largest:.3g}, beyond {MAX_ABS_LOGIT:.0g}"
        return None
    longest = float(torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32).max())
    if longest > norm_bound:
        return (
            f"Adapter tensor '{name}' has a vector of length {longest:.3g}, beyond {norm_bound:.3g} "
            f"({MAX_NORM_RATIO:.0g} times the longest row of the base model's embedding table)"
        )
    return None


def check_savable(tensors: Mapping[str, torch.Tensor], adapter_name: str, norm_bound: float) -> None:
    """Refuse to save an adapter whose tensors the loader would refuse, naming the tensor."""
    for name, value in tensors.items():
        problem = tensor_problem(name, value, norm_bound)
        if problem is not None:
            raise ValueError(
                f"Cannot save adapter '{adapter_name}': {problem}, so the file would be refused when loaded. "
                "Training diverged: go back to the last good save or checkpoint and lower the learning rate."
            )
