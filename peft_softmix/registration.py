"""Explicit registration of the SOFT_MIXTURE method in PEFT's registries.

PEFT 0.21's `PeftType` is a closed Enum, so `peft.utils.register_peft_method` refuses new names; its mapping dicts
accept a plain string key, and `PeftType` members compare equal to their string values, so that is what we use.

Registration only adds entries to those registries: nothing that PEFT's other methods use is replaced or wrapped.
(So `PeftModel.from_pretrained` parses ``adapter_config.json`` in PEFT's own code, with PEFT's own errors, before
peft_softmix sees it; `PeftModelForSoftMixture.from_pretrained` checks the file first and names it.)
"""

from __future__ import annotations

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
