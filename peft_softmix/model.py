"""The adapter's trainable state: soft words, deep offsets and mixture logits."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BasePromptEncoder
from torch import nn

from .config import SoftMixtureConfig, SoftMixtureInit
from .errors import AdapterLoadError
from .hooks import SoftPositions
from .tokenization import TemplateLayout
from .trust import check_savable, embedding_norm_bound, tensor_problem

__all__ = ["SoftMixtureModel", "put_soft_words"]


def put_soft_words(
    table: torch.Tensor, inputs_embeds: torch.Tensor, positions: SoftPositions, scale: Any = None
) -> torch.Tensor:
    """``inputs_embeds`` with row ``positions.words[i]`` of ``table`` (times ``scale`` unless None) at each of
    ``positions.index``: O(P) in forward and backward."""
    words = table.index_select(0, positions.words)
    if scale is not None:
        words = words * scale
    flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
    return flat.index_copy(0, positions.index, words.to(inputs_embeds.dtype)).view(inputs_embeds.shape)


class SoftMixtureModel(BasePromptEncoder):
    """
    The module that holds a mixture of soft prompts for one relation (the part `PromptEmbedding` plays for prompt
    tuning).

    Args:
        config ([`SoftMixtureConfig`]): The configuration of the adapter.
        word_embeddings (`torch.nn.Embedding`): The base model's input embeddings (for `init="template"`).
        layouts (`list[TemplateLayout]`): The token layout of each template.
        deep_hidden_size (`int`): The width of the hidden states entering each layer (for deep offsets).

    **Attributes**:
        - **soft_words** (`torch.nn.Parameter`) -- `[n_soft, embedding_dim]`, the words of all K templates in order.
        - **deep_offsets** (`torch.nn.Parameter` or `None`) -- `[num_deep_layers, n_soft, hidden]`, zero at start.
        - **mixture_logits** (`torch.nn.Parameter`) -- `[K]`, the mixture weights are their softmax.
    """

    def __init__(
        self,
        config: SoftMixtureConfig,
        word_embeddings: nn.Embedding,
        layouts: list[TemplateLayout],
        deep_hidden_size: int = 0,
    ):
        super().__init__()
        token_ids = torch.tensor([t for layout in layouts for t in layout.token_ids], dtype=torch.long)
        table = word_embeddings.weight.detach()
        # loaded (and saved) tensors longer than this are refused: see peft_softmix.trust
        self.norm_bound = embedding_norm_bound(table)
        if SoftMixtureInit(config.init) == SoftMixtureInit.TEMPLATE:
            init = table[token_ids.to(table.device)].float().clone()
        else:
            generator = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
            mean, std = table.float().mean(0).cpu(), table.float().std(0).cpu()
            noise = torch.randn(len(token_ids), table.shape[1], generator=generator)
            init = (mean + std * noise).to(table.device)
        # adapter tensors stay fp32 whatever the base dtype: they are tiny and fp16 updates would underflow
        self.soft_words = nn.Parameter(init)

        num_deep = config.num_deep_layers or 0
        self.deep_offsets = (
            nn.Parameter(torch.zeros(num_deep, len(token_ids), deep_hidden_size, device=table.device))
            if num_deep
            else None
        )
        if config.template_weights is not None:
            logits = torch.tensor([math.log(w) for w in config.template_weights])
            logits = logits - logits.logsumexp(0)
        else:
            logits = torch.zeros(len(layouts))
        self.mixture_logits = nn.Parameter(logits.to(table.device))
        # loaded for inference (PeftModel.from_pretrained without is_trainable), the adapter stays frozen as in PEFT
        trainable = not config.inference_mode
        self.set_trainable(config.train_prompts and trainable, config.train_weights and trainable)

    def set_trainable(self, prompts: bool, weights: bool) -> None:
        self.soft_words.requires_grad_(prompts)
        if self.deep_offsets is not None:
            self.deep_offsets.requires_grad_(prompts)
        self.mixture_logits.requires_grad_(weights)

    @property
    def num_templates(self) -> int:
        return int(self.mixture_logits.shape[0])

    @property
    def num_soft_words(self) -> int:
        """The words of all K templates: each filled query of a fact holds its template's words once."""
        return int(self.soft_words.shape[0])

    def log_weights(self) -> torch.Tensor:
        """log pi_k, the log mixture weights."""
        return torch.log_softmax(self.mixture_logits.float(), dim=0)

    def forward(self, inputs_embeds: torch.Tensor, positions: SoftPositions, scale: Any = None) -> torch.Tensor:
        """Put the soft words (times ``scale``, the embedding's own scale if it has one) at their ``positions``."""
        return put_soft_words(self.soft_words, inputs_embeds, positions, scale)

    # -- PEFT's (de)serialisation hooks ------------------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a saved adapter holds, by their name in the file."""
        tensors = {"soft_words": self.soft_words, "mixture_logits": self.mixture_logits}
        if self.deep_offsets is not None:
            tensors["deep_offsets"] = self.deep_offsets
        return {name: tensor.detach() for name, tensor in tensors.items()}

    def check_savable(self, adapter_name: str) -> None:
        """Refuse, naming the tensor, to save NaN, inf or absurdly large values that the loader would refuse."""
        check_savable(self.adapter_tensors(), adapter_name, self.norm_bound)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return model.prompt_encoder[adapter_name].adapter_tensors()

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = {"soft_words": self.soft_words, "mixture_logits": self.mixture_logits}
        if self.deep_offsets is not None:
            expected["deep_offsets"] = self.deep_offsets
        # every tensor in the file must be one this adapter has: a stray one means the file was assembled by hand
        present = dict(state_dict)
        missing = sorted(set(expected) - set(present))
        unexpected = sorted(set(present) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(
                f"The adapter weights do not match its config: missing {missing or 'nothing'}, unexpected "
                f"{unexpected or 'nothing'}. The weights file and adapter_config.json come from different adapters."
            )
        for name, param in expected.items():
            value = present[name]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterLoadError(
                    f"Adapter tensor '{name}' has shape {tuple(value.shape)} but this adapter's layout needs "
                    f"{tuple(param.shape)}: the weights were trained with other templates, tokenizer or base model."
                )
            if not value.is_floating_point():
                raise AdapterLoadError(
                    f"Adapter tensor '{name}' has dtype {value.dtype}, not a floating point type; the file was not "
                    "written by peft_softmix or was edited."
                )
            problem = tensor_problem(name, value, self.norm_bound)
            if problem is not None:
                raise AdapterLoadError(
                    f"{problem}; the file is corrupted or was edited (such values make every answer NaN or "
                    "meaningless), or it belongs to another base model."
                )
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(present[name].to(device=param.device, dtype=param.dtype))
