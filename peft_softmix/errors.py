"""Every error peft_softmix raises on purpose, in one place (bad input or a run that cannot go on, never a bug).

Each is raised with a message that names the problem (the file and line, the template, the model type) and the fix.
"""

from __future__ import annotations

__all__ = [
    "AdapterLoadError",
    "ChecksumError",
    "DataFormatError",
    "OutputDirError",
    "QueryTooLongError",
    "RelationDataError",
    "ResumeError",
    "TemplateError",
    "TemplateSetError",
    "TrainingDiverged",
    "TrainingSetupError",
    "UnsupportedArchitectureError",
]


class AdapterLoadError(ValueError):
    """An adapter file that cannot be read, or does not fit the adapter or base model it is loaded into."""


class QueryTooLongError(ValueError):
    """A filled template has more tokens than the base model has positions."""


class TemplateError(ValueError):
    """A template that cannot be used as a cloze query."""


class UnsupportedArchitectureError(ValueError):
    """A base model whose architecture cannot take a mixture of soft prompts (or deep prompts)."""


class TemplateSetError(ValueError):
    """A template source that is unknown, lacks the relation, or has no usable template for it."""


class DataFormatError(ValueError):
    """A data file that cannot be read as facts; the message names the file, the line and the problem."""


class ResumeError(ValueError):
    """A checkpoint cannot continue this run: another run's, other settings, or a broken file (named)."""


class OutputDirError(OSError):
    """The output folder cannot be written, or another run holds it."""


class RelationDataError(ValueError):
    """The facts, templates or vocabulary of a run cannot be used; the message says which and how to fix it."""


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite; the message names the step and the last good checkpoint."""


class TrainingSetupError(ValueError):
    """The run cannot train as asked on this machine (e.g. a mixed precision its device does not run)."""


class ChecksumError(ValueError):
    """A downloaded file whose SHA-256 is not the pinned one; the message names the file, the URL and both hashes."""
