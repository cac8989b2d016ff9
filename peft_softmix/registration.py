"""Explicit registration of the SOFT_MIXTURE method in PEFT's registries.

PEFT 0.21's `PeftType` is a closed Enum, so `peft.utils.register_peft_method` refuses new names; its mapping dicts
accept a plain string key, and `PeftType` members compare equal to their string values, so that is what we use.
"""

from __future__ import annotations

import functools
import json
import os
from importlib.metadata import version

from packaging.version import Version

from .config import PEFT_TYPE, TASK_TYPE, SoftMixtureConfig
from .model import SoftMixtureModel
from .peft_model import PeftModelForSoftMixture

# The PEFT minor versions the test suite proves (pyproject.toml pins the same range).
TESTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def _peft_internals():
    try:
        from peft import auto, mapping
        from peft.tuners.tuners_utils import BasePromptEncoder  # noqa: F401

        registries = (
            mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
            mapping.PEFT_TYPE_TO_TUNER_MAPPING,
            mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
            auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
        )
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"peft_softmix needs PEFT's adapter registries, which moved in peft {version('peft')} ({err}). "
            f"Install a tested PEFT: pip install 'peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]}'."
        ) from err
    if not all(isinstance(registry, dict) for registry in registries):
        raise ImportError(
            f"PEFT {version('peft')}'s adapter registries are no longer dicts. Install a tested PEFT: "
            f"pip install 'peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]}'."
        )
    return registries


def _name_the_config_file(get_peft_type):
    """Wrap `PeftConfig._get_peft_type` so that an unreadable ``adapter_config.json`` is named in the error.

    `PeftModel.from_pretrained` reads the file there before any method-specific code runs; a broken file already
    fails at that point, this only turns PEFT's bare `JSONDecodeError` / `KeyError` into a message with the path.
    """

    original = get_peft_type.__func__  # keep it a classmethod: `cls` decides which from_json_file reads the file

    @functools.wraps(original)
    def wrapped(cls, model_id, **hf_hub_download_kwargs):
        try:
            return original(cls, model_id, **hf_hub_download_kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            subfolder = hf_hub_download_kwargs.get("subfolder")
            folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
            path = os.path.join(folder, "adapter_config.json")
            problem = f"has no 'peft_type' ({err!r})" if isinstance(err, KeyError) else f"is not valid JSON ({err})"
            raise ValueError(
                f"{path} {problem}: the file is truncated or was edited by hand. Save the adapter again, or restore "
                "the file."
            ) from None

    wrapped._peft_softmix_wrapped = True  # type: ignore[attr-defined]
    return classmethod(wrapped)


def register() -> None:
    """Make `get_peft_model` and `PeftModel.from_pretrained` know SOFT_MIXTURE. Safe to call twice."""
    installed = Version(version("peft"))
    if not TESTED_PEFT[0] <= installed < TESTED_PEFT[1]:
        raise ImportError(
            f"peft_softmix is tested with peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]} and uses its internals; peft "
            f"{installed} is installed. Install a tested PEFT: pip install 'peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]}'."
        )
    config_map, tuner_map, prefix_map, model_map = _peft_internals()
    config_map[PEFT_TYPE] = SoftMixtureConfig
    tuner_map[PEFT_TYPE] = SoftMixtureModel
    prefix_map[PEFT_TYPE] = "soft_mixture_"
    model_map[TASK_TYPE] = PeftModelForSoftMixture
    from peft.config import PeftConfigMixin

    if not getattr(PeftConfigMixin._get_peft_type, "_peft_softmix_wrapped", False):
        PeftConfigMixin._get_peft_type = _name_the_config_file(PeftConfigMixin._get_peft_type)  # type: ignore[method-assign]
