"""`TrainingArguments`: how one relation is trained, as a dataclass whose fields are the training script's flags,
and the presets (``--preset paper``: the paper's reference protocol)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PRESETS", "TrainingArguments", "preset_note"]

# The paper's reference protocol (Qin & Eisner's code): mixture weights by EM, Adam at 1e-3, up to 16 epochs,
# patience 4. The defaults of `TrainingArguments` are the demo's faster ones.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"mixture_fit": "em", "learning_rate": 1e-3, "num_train_epochs": 16, "patience": 4},
}


@dataclass
class TrainingArguments:
    """
    How one relation is trained. The field names are the flags of ``examples/train_trex.py``.

    Args:
        learning_rate (`float`): Adam's learning rate.
        weight_decay (`float`): Adam's weight decay.
        num_train_epochs (`int`): The most epochs to train.
        patience (`int`): Stop after this many epochs without a better dev P@1.
        per_device_train_batch_size (`int`): Facts per training batch and process.
        per_device_eval_batch_size (`int`): Facts per evaluation batch and process.
        gradient_accumulation_steps (`int`): Batches per optimizer step.
        seed (`int`): Seed of the training batches' order (and, through the caller's `set_seed`, of everything else).
        mixture_fit (`str`): ``"gradient"`` trains the mixture weights with the rest; ``"em"`` fits them by EM once
            per epoch (the paper's procedure).
        multi_token (`bool`): Train on all facts, objects of any length (one mask per object token), and evaluate by
            ranking each relation's candidate objects; False keeps the paper's single-token setting.
        length_normalized (`bool`): With ``multi_token``, rank candidates by log p(c|x) divided by their number of
            tokens instead of by log p(c|x).
    """

    learning_rate: float = field(default=1e-2, metadata={"help": "Adam's learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam's weight decay."})
    num_train_epochs: int = field(default=8, metadata={"help": "The most epochs to train."})
    patience: int = field(default=3, metadata={"help": "Stop after N epochs without a better dev P@1."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Facts per training batch."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Facts per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    seed: int = field(default=42, metadata={"help": "Seed of the batch order (and of the run, via set_seed)."})
    mixture_fit: str = field(
        default="gradient",
        metadata={"help": "How the mixture weights are fit: 'gradient' or 'em'.", "choices": ("gradient", "em")},
    )
    multi_token: bool = field(
        default=False,
        metadata={"help": "Train on all facts (objects of any length) and evaluate by ranking candidate objects."},
    )
    length_normalized: bool = field(
        default=False,
        metadata={"help": "With --multi_token, rank candidates by log p per token instead of log p."},
    )

    # what a resumed run may change (the result then differs from an uninterrupted run, which is reported)...
    ADJUSTABLE = ("learning_rate", "weight_decay", "gradient_accumulation_steps")
    # ...and what it must keep: these shape the batches, the random states or the procedure
    FIXED = ("per_device_train_batch_size", "seed", "mixture_fit", "multi_token", "length_normalized")
    # fixed settings that checkpoints of earlier versions did not record, read there as these values
    RECORDED_SINCE = {"multi_token": False, "length_normalized": False}

    def __post_init__(self) -> None:
        for name in (
            "num_train_epochs",
            "patience",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.mixture_fit not in ("gradient", "em"):
            raise ValueError(f"--mixture_fit must be 'gradient' or 'em', got {self.mixture_fit!r}.")
        if self.length_normalized and not self.multi_token:
            raise ValueError("--length_normalized ranks candidate objects, which only --multi_token does; add it.")
        if self.learning_rate < 0 or self.weight_decay < 0:
            raise ValueError("--learning_rate and --weight_decay cannot be negative.")

    @classmethod
    def from_preset(cls, preset: str | None, **given: Any) -> TrainingArguments:
        """The arguments of ``preset`` (a key of `PRESETS`, or None for the defaults), with ``given`` on top.

        A value of None in ``given`` means "not given": the preset's (or the default) value stays.
        """
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; the presets are {', '.join(PRESETS)}.")
        values = dict(PRESETS.get(preset, {}) if preset else {})
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def settings(self) -> dict[str, Any]:
        """The fields a checkpoint records to check a resumed run against."""
        values = asdict(self)
        return {name: values[name] for name in self.FIXED + self.ADJUSTABLE}


def preset_note(preset: str, given: Mapping[str, Any]) -> str:
    """What ``preset`` sets, and which of its values an explicit flag in ``given`` overrides."""
    parts = []
    for name, value in PRESETS[preset].items():
        explicit = given.get(name)
        parts.append(f"--{name} {value}" if explicit is None else f"--{name} {explicit} (given; preset: {value})")
    return f"--preset {preset}: " + ", ".join(parts)
