"""peft_softmix: mixtures of soft prompts for querying masked LMs (Qin & Eisner, NAACL 2021), as a PEFT adapter.

Importing the package registers the ``SOFT_MIXTURE`` method with PEFT, so that ``get_peft_model`` and
``PeftModel.from_pretrained`` know it.
"""

__version__ = "0.1.0"

from .config import PEFT_TYPE, SoftMixtureConfig, SoftMixtureInit, SoftMixtureType  # noqa: E402
from .denormals import flush_denormals  # noqa: E402
from .errors import (  # noqa: E402
    AdapterLoadError,
    ChecksumError,
    DataFormatError,
    OutputDirError,
    QueryTooLongError,
    RelationDataError,
    ResumeError,
    TemplateError,
    TemplateSetError,
    TrainingDiverged,
    TrainingSetupError,
    UnsupportedArchitectureError,
)
from .model import SoftMixtureModel  # noqa: E402
from .peft_model import PeftModelForSoftMixture, SoftMixtureOutput  # noqa: E402
from .pipeline import FactQueryPipeline, register_pipeline  # noqa: E402
from .processing import DroppedObjectsWarning, SoftMixtureProcessor  # noqa: E402
from .registration import register  # noqa: E402
from .trainer import RelationTrainer  # noqa: E402
from .training import train_relation  # noqa: E402
from .training_args import TrainingArguments  # noqa: E402

register()
register_pipeline()  # pipeline("fact-query", model=peft_model)

__all__ = [
    "AdapterLoadError",
    "ChecksumError",
    "DataFormatError",
    "DroppedObjectsWarning",
    "FactQueryPipeline",
    "OutputDirError",
    "PEFT_TYPE",
    "PeftModelForSoftMixture",
    "QueryTooLongError",
    "RelationDataError",
    "RelationTrainer",
    "ResumeError",
    "SoftMixtureConfig",
    "SoftMixtureInit",
    "SoftMixtureModel",
    "SoftMixtureOutput",
    "SoftMixtureProcessor",
    "SoftMixtureType",
    "TemplateError",
    "TemplateSetError",
    "TrainingArguments",
    "TrainingDiverged",
    "TrainingSetupError",
    "UnsupportedArchitectureError",
    "__version__",
    "flush_denormals",
    "train_relation",
]
