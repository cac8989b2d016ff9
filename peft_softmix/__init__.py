"""peft_softmix: mixtures of soft prompts for querying masked LMs (Qin & Eisner, NAACL 2021), as a PEFT adapter.

Importing the package registers the ``SOFT_MIXTURE`` method with PEFT, so that ``get_peft_model`` and
``PeftModel.from_pretrained`` know it.
"""

__version__ = "0.1.0"

from .config import PEFT_TYPE, TASK_TYPE, SoftMixtureConfig, SoftMixtureInit  # noqa: E402
from .model import AdapterLoadError, SoftMixtureModel  # noqa: E402
from .peft_model import PeftModelForSoftMixture, QueryTooLongError, SoftMixtureOutput  # noqa: E402
from .registration import register  # noqa: E402
from .tokenization import TemplateError, object_token_id  # noqa: E402

register()

__all__ = [
    "PEFT_TYPE",
    "TASK_TYPE",
    "AdapterLoadError",
    "PeftModelForSoftMixture",
    "QueryTooLongError",
    "SoftMixtureConfig",
    "SoftMixtureInit",
    "SoftMixtureModel",
    "SoftMixtureOutput",
    "TemplateError",
    "__version__",
    "object_token_id",
    "register",
]
