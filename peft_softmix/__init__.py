"""peft_softmix: mixtures of soft prompts for querying masked LMs (Qin & Eisner, NAACL 2021), as a PEFT adapter.

Importing the package registers the ``SOFT_MIXTURE`` method with PEFT, so that ``get_peft_model`` and
``PeftModel.from_pretrained`` know it.
"""

__version__ = "0.1.0"

from .config import PEFT_TYPE, SoftMixtureConfig, SoftMixtureInit  # noqa: E402
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
from .pipeline import FactQueryPipeline, register_pipeline  # noqa: E402
from .processing import DroppedObjectsWarning, SoftMixtureProcessor  # noqa: E402
from .registration import register  # noqa: E402

register()
register_pipeline()  # pipeline("fact-query", model=peft_model)

__all__ = [
    "PEFT_TYPE",
    "AdapterLoadError",
    "DataFormatError",
    "DroppedObjectsWarning",
    "FactQueryPipeline",
    "PeftModelForSoftMixture",
    "QueryTooLongError",
    "SoftMixtureConfig",
    "SoftMixtureInit",
    "SoftMixtureModel",
    "SoftMixtureOutput",
    "SoftMixtureProcessor",
    "TemplateError",
    "TemplateSetError",
    "UnsupportedArchitectureError",
    "__version__",
]
