"""Configuration of a mixture of soft prompts (Qin & Eisner, NAACL 2021)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft.config import PromptLearningConfig

from .tokenization import validate_template

PEFT_TYPE = "SOFT_MIXTURE"
TASK_TYPE = "SOFT_MIXTURE"
CONFIG_FORMAT_VERSION = 1


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
            The base model's tokenizer. Defaults to the base model's own name or path.
        tokenizer_kwargs (`dict`, *optional*):
            Keyword arguments for `AutoTokenizer.from_pretrained`.
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
        default=None, metadata={"help": "Keyword arguments passed to `AutoTokenizer.from_pretrained`."}
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
        if self.format_version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"This adapter was written in format version {self.format_version}, newer than this peft_softmix "
                f"understands ({CONFIG_FORMAT_VERSION}). Upgrade peft_softmix: pip install -U peft-softmix."
            )

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["init"] = SoftMixtureInit(self.init).value
        return output
