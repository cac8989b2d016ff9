"""peft_softmix: mixtures of soft prompts for querying masked LMs (Qin & Eisner, NAACL 2021), as a PEFT adapter.

Importing the package registers the ``SOFT_MIXTURE`` method with PEFT, so that ``get_peft_model`` and
``PeftModel.from_pretrained`` know it.
"""

__version__ = "0.1.0"

from .config import PEFT_TYPE, SoftMixtureConfig, SoftMixtureInit, SoftMixtureType  # noqa: E402
from .errors import (  # noqa: E402
    AdapterLoadError,
    DataFormatError,
    QueryTooLongError,
    TemplateError,
    TemplateSetError,
    UnsupportedArchitectureError,
)
from .model import SoftMixtureModel  # noqa: E402
from .peft_model import PeftModelForSoftMixture, SoftMixtureOutput  # noqa: E402
from .processing import SoftMixtureProcessor  # noqa: E402
from .registration import register  # noqa: E402

register()

__all__ = [
    "PEFT_TYPE",
    "AdapterLoadError",
    "DataFormatError",
    "PeftModelForSoftMixture",
    "QueryTooLongError",
    "SoftMixtureConfig",
    "SoftMixtureInit",
    "SoftMixtureModel",
    "SoftMixtureOutput",
    "SoftMixtureProcessor",
    "SoftMixtureType",
    "TemplateError",
    "TemplateSetError",
    "UnsupportedArchitectureError",
    "__version__",
]
