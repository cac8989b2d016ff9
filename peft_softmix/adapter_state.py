"""`AdapterStateMixin`: which adapters train, which are on, and forgetting one (for `PeftModelForSoftMixture`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel as _Base

    from .config import SoftMixtureConfig
    from .model import SoftMixtureModel
else:
    _Base = object

__all__ = ["AdapterStateMixin"]


class AdapterStateMixin(_Base):
    """Mixture weights, disabling adapters, switching their training and deleting them (inherited by
    `PeftModelForSoftMixture` before `PeftModel`)."""

    if TYPE_CHECKING:
        # provided by PeftModelForSoftMixture
        _processors: dict[str, Any]

        def _encoder(self, adapter_name: str | None = None) -> SoftMixtureModel: ...

        def _softmix_config(self, adapter_name: str | None = None) -> SoftMixtureConfig: ...

    def mixture_weights(self, adapter_name: str | None = None) -> list[float]:
        """The mixture weights pi_k of an adapter (the active one by default)."""
        encoder = self._encoder(adapter_name)
        return encoder.log_weights().exp().tolist()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Query with the hard templates and a uniform mixture (the frozen model alone)."""
        was_disabled = self._adapters_disabled
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = was_disabled

    def _make_trainable(self, adapter_name: str) -> None:
        config = self._softmix_config(adapter_name)
        config.inference_mode = False
        self._encoder(adapter_name).set_trainable(config.train_prompts, config.train_weights)
        self.train()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training of the given adapters on (within their config's `train_prompts`/`train_weights`) or off."""
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            config = self._softmix_config(name)
            self._encoder(name).set_trainable(
                requires_grad and config.train_prompts, requires_grad and config.train_weights
            )

    def delete_adapter(self, adapter_name: str) -> None:
        """Like `PeftModel.delete_adapter`, and the adapter's query encoder (tokenizer, caches) goes with it."""
        super().delete_adapter(adapter_name)
        self._processors.pop(adapter_name, None)

    def _forget_adapter(self, adapter_name: str) -> None:
        self.peft_config.pop(adapter_name, None)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        self._processors.pop(adapter_name, None)
