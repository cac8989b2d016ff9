"""Configuration of a mixture of soft prompts (Qin & Eisner, NAACL 2021)."""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from peft.config import PromptLearningConfig
from peft.utils import CONFIG_NAME

from .errors import AdapterLoadError
from .tokenization import validate_template


class SoftMixtureType(str, enum.Enum):
    """The ``peft_type`` of a mixture of soft prompts.

    PEFT's own `PeftType` is a closed Enum, so this is a str-Enum of its own with the same behaviour: its member
    equals and hashes as the string ``"SOFT_MIXTURE"`` (so it is the key of PEFT's registries and what the config file
    holds), and it has the ``.value`` that PEFT's code reads (error messages, the model card check).
    """

    SOFT_MIXTURE = "SOFT_MIXTURE"

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)


PEFT_TYPE = SoftMixtureType.SOFT_MIXTURE
TASK_TYPE = "SOFT_MIXTURE"
CONFIG_FORMAT_VERSION = 1
# Written by `PeftModelForSoftMixture` when the adapter is created; a saved adapter without them was not written by
# peft_softmix, or was edited, and its soft words could not be checked against the tokenizer.
SAVED_KEYS = ("peft_type", "templates", "template_token_ids", "vocab_size", "token_dim")


def check_format_version(version: object, source: str | None = None) -> None:
    """Refuse an adapter written in a newer file format than this peft_softmix reads (``source``: the file)."""
    if isinstance(version, int) and not isinstance(version, bool) and version <= CONFIG_FORMAT_VERSION:
        return
    raise AdapterLoadError(
        f"{source or 'This adapter'} was written in format version {version!r}, newer than this peft_softmix "
        f"understands ({CONFIG_FORMAT_VERSION}). Upgrade peft_softmix: pip install -U peft-softmix."
    )


@contextmanager
def naming_config_file(source: str | None) -> Iterator[None]:
    """Make a problem found in a saved ``adapter_config.json`` (``source``) an `AdapterLoadError` naming the file.

    The one place that words such errors for the content of the file, whether it shows when the config is built
    (a template without ``[Y]``) or when it meets the base model and tokenizer (templates edited after training).
    ``source`` None (a config made in memory) leaves errors as they are.
    """
    try:
        yield
    except (ValueError, TypeError) as err:
        if source is None or source in str(err):
            raise
        raise AdapterLoadError(f"{source}: {err}") from err


class SoftMixtureInit(str, enum.Enum):
    TEMPLATE = "template"
    RANDOM = "random"


@dataclass
class SoftMixtureConfig(PromptLearningConfig):
    """
    This is the configuration class to store the configuration of a [`SoftMixtureModel`]: K cloze templates for one
    relation whose words are trainable vectors, optionally with per-layer offsets, mixed with learned weights.

    Args:
        templates (`list[str]`):
            LAMA-style templates: `[X]` is the subject slot, `[Y]` the object slot (it becomes the mask token), every
            other word becomes a soft word, in its place in the template.
        tokenizer_name_or_path (`str`, *optional*):
            The base model's tokenizer. Defaults to the base model's own name or path. A saved adapter that names
            another tokenizer than its base model's loads only with the user's consent (`tokenizer=` when loading).
        tokenizer_kwargs (`dict`, *optional*):
            Options for `AutoTokenizer.from_pretrained`, from a short harmless list (`use_fast`, `do_lower_case`,
            `strip_accents`, `add_prefix_space`, `model_max_length`); see `peft_softmix.trust`.
        init (`str`):
            `"template"` starts every soft word at its token's embedding (the hard prompt), `"random"` draws it from
            the embedding table's mean and spread, in the same layout.
        deep (`bool` or `int`):
            Also train an offset, initialised at zero, added to the hidden state of every template position before
            every transformer layer (`True`), or before the first `deep` layers (an `int`).
        train_prompts (`bool`):
            Whether the soft words (and deep offsets) are trained.
        train_weights (`bool`):
            Whether the mixture weights are trained. With `False` and no `template_weights` the mixture is uniform.
        template_weights (`list[float]`, *optional*):
            Initial mixture weights (any positive numbers, normalised); uniform if not given.
        seed (`int`, *optional*):
            Seed for `init="random"`, so that the random start is reproducible.
    """

    templates: list[str] = field(default_factory=list, metadata={"help": "Cloze templates with [X] and [Y]."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model's tokenizer (defaults to the base model's name or path)."}
    )
    tokenizer_kwargs: dict | None = field(
        default=None, metadata={"help": "Options for `AutoTokenizer.from_pretrained` (use_fast, do_lower_case, ...)."}
    )
    init: SoftMixtureInit | str = field(
        default=SoftMixtureInit.TEMPLATE,
        metadata={"help": "'template' (the token embeddings) or 'random' (same layout, random vectors)."},
    )
    deep: bool | int = field(
        default=False, metadata={"help": "Per-layer offsets at template positions: True (all layers) or a count."}
    )
    train_prompts: bool = field(default=True, metadata={"help": "Train the soft words and deep offsets."})
    train_weights: bool = field(default=True, metadata={"help": "Train the mixture weights."})
    template_weights: list[float] | None = field(
        default=None, metadata={"help": "Initial mixture weights (normalised); uniform if not given."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed for init='random'."})
    # Written when the adapter is created, checked when it is loaded: the layout must come out the same.
    template_token_ids: list[list[list[int]]] | None = field(
        default=None, metadata={"help": "Filled in automatically: each template's token ids around its slots."}
    )
    vocab_size: int | None = field(default=None, metadata={"help": "Filled in automatically: base vocabulary."})
    tokenizer_class: str | None = field(default=None, metadata={"help": "Filled in automatically."})
    num_deep_layers: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    format_version: int = field(default=CONFIG_FORMAT_VERSION, metadata={"help": "Adapter file format version."})

    def __post_init__(self):
        # PEFT validates task_type against its closed TaskType enum; ours is registered in its model mapping instead.
        self.task_type = None
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.task_type = TASK_TYPE
        if isinstance(self.templates, str):
            self.templates = [self.templates]
        self.templates = list(self.templates)
        if not self.templates:
            raise ValueError(
                "SoftMixtureConfig needs at least one template (K=0 given), e.g. templates=['[X] was born in [Y] .']."
            )
        for template in self.templates:
            validate_template(template)
        repeated = next((t for i, t in enumerate(self.templates) if t in self.templates[:i]), None)
        if repeated is not None:
            where = [i for i, t in enumerate(self.templates) if t == repeated]
            raise ValueError(
                f"templates lists {repeated!r} more than once (at positions {where}): a repeat only doubles that "
                "template's starting weight. Give each template once (template_weights "
                "sets starting weights)."
            )
        try:
            self.init = SoftMixtureInit(self.init)
        except ValueError:
            raise ValueError(f"init must be 'template' or 'random', got {self.init!r}.") from None
        if isinstance(self.deep, bool):
            pass
        elif not isinstance(self.deep, int) or self.deep < 0:
            raise ValueError(f"deep must be True/False or a number of layers >= 0, got {self.deep!r}.")
        if self.template_weights is not None:
            weights = [float(w) for w in self.template_weights]
            if len(weights) != len(self.templates):
                raise ValueError(
                    f"template_weights has {len(weights)} entries for {len(self.templates)} templates; give one per "
                    "template."
                )
            if any(not w > 0 for w in weights):
                raise ValueError(f"template_weights must all be positive, got {weights}.")
            self.template_weights = weights
        check_format_version(self.format_version)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["init"] = SoftMixtureInit(self.init).value
        return output

    # -- reading a saved adapter_config.json: every error names the file ---------------------------------------

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        try:
            with open(path_json_file, encoding="utf-8") as file:
                attributes = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterLoadError(
                f"{path_json_file} is not valid JSON ({err}): the file is truncated or was edited by hand. Save the "
                "adapter again, or restore the file."
            ) from None
        if not isinstance(attributes, dict):
            raise AdapterLoadError(
                f"{path_json_file} holds a JSON {type(attributes).__name__}, not the object of an adapter config."
            )
        missing = [key for key in SAVED_KEYS if key not in attributes]
        if missing:
            raise AdapterLoadError(
                f"{path_json_file} lacks {missing}, which peft_softmix writes into every saved adapter: the file was "
                "edited by hand or does not come from peft_softmix. Restore it from the adapter's original files."
            )
        if attributes["peft_type"] != PEFT_TYPE:
            raise AdapterLoadError(
                f"{path_json_file} has peft_type {attributes['peft_type']!r}, not {PEFT_TYPE!r}: it is not a mixture "
                "of soft prompts adapter. Load it with the PEFT class it was made with."
            )
        check_format_version(attributes.get("format_version", CONFIG_FORMAT_VERSION), path_json_file)
        templates, token_ids = attributes["templates"], attributes["template_token_ids"]
        # null in a config saved on its own, before any model filled it in; then the weights' shapes are the check
        if token_ids is not None and (
            not isinstance(templates, list) or not isinstance(token_ids, list) or len(templates) != len(token_ids)
        ):
            raise AdapterLoadError(
                f"{path_json_file} lists {len(templates) if isinstance(templates, list) else templates!r} templates "
                f"but token ids for {len(token_ids) if isinstance(token_ids, list) else token_ids!r}: the templates "
                "were edited after training. Restore the templates the adapter was trained with."
            )
        attributes.pop("runtime_config", None)  # runtime-only, never meaningful in a file
        return attributes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        source = os.path.join(folder, CONFIG_NAME)
        # the user's consent to a tokenizer the file names (`PeftModel.from_pretrained(..., tokenizer=...)`)
        consent = kwargs.pop("tokenizer", None)
        with naming_config_file(source):
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # lets the checks against the base model and tokenizer name the file (not a field: never saved)
        config._source_file = source
        config._tokenizer_consent = consent
        return config
