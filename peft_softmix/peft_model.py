"""`PeftModelForSoftMixture`: a frozen masked LM queried through a mixture of soft prompts.

This module builds an adapter on a base model (finding its parts, checking that the adapter fits, one probe forward
pass), runs the forward pass and the mixture, and answers queries. The adapter's query encoder is its
`SoftMixtureProcessor` (processing.py); saving and loading come from `AdapterFilesMixin` (serialization.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from .adapter_state import AdapterStateMixin
from .answers import query_model
from .architectures import (
    ProbeResult,
    check_supported,
    find_backbone,
    input_embeddings,
    max_query_length,
    probe_model,
    tied_embedding_modules,
)
from .config import SoftMixtureConfig, naming_config_file
from .decoding import DEFAULT_STRATEGY
from .hooks import deep_prompt_hooks, gather_mask_positions, soft_word_embeddings
from .inputs import check_forward_kwargs, check_subjects
from .mixture import mix_templates
from .model import SoftMixtureModel
from .objects import encode_objects
from .processing import IGNORE_INDEX, SoftMixtureProcessor, encode_facts
from .ranking import CandidateScores, score_candidates
from .routing import hard_route, resolve_adapter_names, route
from .scoring import SoftMixtureOutput, object_head, vocabulary_head
from .serialization import AdapterFilesMixin, check_adapter_fits
from .tokenization import TemplateLayout, encode_query
from .trust import base_model_name, load_tokenizer

__all__ = ["IGNORE_INDEX", "PeftModelForSoftMixture", "SoftMixtureOutput", "mix_templates"]


class PeftModelForSoftMixture(AdapterFilesMixin, AdapterStateMixin, PeftModel):
    """
    A frozen masked LM queried through a mixture of soft prompts. Built by `get_peft_model(model, SoftMixtureConfig)`
    or `PeftModel.from_pretrained(model, adapter_dir)` once `peft_softmix` is imported.

    Typical use:

    ```py
    >>> batch = peft_model.encode(["Dante"], ["Florence"])
    >>> out = peft_model(**batch)  # out.loss, out.log_probs [B, V]
    >>> peft_model.query(["Dante"], top_k=5)
    ```
    """

    # -- building the adapter --------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: SoftMixtureConfig,  # type: ignore[override]
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if not isinstance(peft_config, SoftMixtureConfig):
            raise TypeError(f"PeftModelForSoftMixture takes a SoftMixtureConfig, got {type(peft_config).__name__}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if peft_config.base_model_name_or_path is None:
            # as get_peft_model does for the first adapter: the tokenizer of a from_pretrained base is found by name
            peft_config.base_model_name_or_path = self.base_model.__dict__.get("name_or_path") or None
        self.peft_config[adapter_name] = peft_config
        try:
            # a problem found while fitting a saved adapter to this model names its adapter_config.json
            with naming_config_file(getattr(peft_config, "_source_file", None)):
                self._setup_prompt_encoder(adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        config = self._softmix_config(adapter_name)
        base = self.base_model
        for param in base.parameters():
            param.requires_grad_(False)
        if not hasattr(self, "prompt_encoder"):
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens = {}
            self._processors: dict[str, SoftMixtureProcessor] = {}
        # a causal LM is scored by the chain rule, never at a [MASK] position (which cannot see the words after it)
        kind = check_supported(base, deep=bool(config.deep))
        embeddings = input_embeddings(base)
        self.word_embeddings = embeddings
        # every module that looks tokens up in that table (seq2seq models keep one per stack)
        self._embedding_tables = tied_embedding_modules(base, embeddings)
        # never runs code; a loaded adapter gets its base model's tokenizer unless the user passed tokenizer=
        tokenizer = load_tokenizer(config, base_model_name(self.base_model))
        processor = SoftMixtureProcessor(
            tokenizer,
            config.templates,
            max_query_length=max_query_length(base, tokenizer),
            model_name=type(base).__name__,
            adapter_name=adapter_name,
            causal=kind == "causal",
        )
        layouts = processor.layouts
        token_ids = [[list(segment) for segment in layout.segments] for layout in layouts]
        check_adapter_fits(config, base, tokenizer, token_ids, embeddings)
        config.template_token_ids = token_ids
        config.vocab_size = embeddings.num_embeddings
        config.token_dim = embeddings.embedding_dim
        config.tokenizer_class = type(tokenizer).__name__
        config.num_virtual_tokens = sum(layout.num_soft_words for layout in layouts)
        config.num_transformer_submodules = 1

        probe = self._probe(base, tokenizer, layouts[0], want_layers=bool(config.deep))
        if config.deep:
            depth = cast(int, probe.depth)
            wanted = depth if config.deep is True else int(config.deep)
            if wanted > depth:
                raise ValueError(f"deep={config.deep} asks for more layers than {type(base).__name__} has ({depth}).")
            config.num_deep_layers = wanted
        else:
            config.num_deep_layers = 0
        config.num_layers = probe.depth

        encoder = SoftMixtureModel(config, embeddings, layouts, deep_hidden_size=probe.hidden_size)
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens)
        self._processors[adapter_name] = processor
        self._layers: list[nn.Module] = probe.layers if probe.layers is not None else getattr(self, "_layers", [])
        # what the probe proved, and what the forward does (a benchmark may switch the mask-only head off)
        self._gather_exact = self._gather_ok = probe.gather_ok

    def _probe(
        self, base: nn.Module, tokenizer: PreTrainedTokenizerBase, layout: TemplateLayout, want_layers: bool
    ) -> ProbeResult:
        """One tiny forward pass of a filled template, to measure the layer depth and check the mask-only head."""
        query = encode_query(tokenizer, layout, "a")
        input_ids = torch.tensor([query.input_ids], device=self.embedding_device)
        return probe_model(base, input_ids, query.mask_position, want_layers=want_layers)

    # typed views of PEFT's containers (PEFT types them for every method; here they hold ours)

    def _encoder(self, adapter_name: str | None = None) -> SoftMixtureModel:
        return cast(SoftMixtureModel, self.prompt_encoder[adapter_name or self.active_adapter])

    def _softmix_config(self, adapter_name: str | None = None) -> SoftMixtureConfig:
        return cast(SoftMixtureConfig, self.peft_config[adapter_name or self.active_adapter])

    @property
    def embedding_device(self) -> torch.device:
        """The device of the base model's input embeddings (where batches go)."""
        return cast(torch.Tensor, cast(nn.Module, self.word_embeddings).weight).device

    @property
    def _vocab_size(self) -> int:
        return int(cast(nn.Embedding, self.word_embeddings).num_embeddings)

    @property
    def transformer_layers(self) -> list[nn.Module]:
        """The layer modules that deep offsets enter, in order (a shared block once); empty when no adapter is deep.

        A copy: changing it changes nothing. For benchmarks and tools that hook the same layers.
        """
        return list(self._layers)

    @property
    def mask_only_head(self) -> bool:
        """Whether the forward runs the LM head at the mask positions only (a probe forward proved it exact for
        this architecture); otherwise it computes the full logits and picks the mask positions.

        Set it to False to run the full head (the answers are the same, only slower: a lever for benchmarks);
        True is accepted only where the probe proved the mask-only head exact.
        """
        return bool(self._gather_ok)

    @mask_only_head.setter
    def mask_only_head(self, value: bool) -> None:
        if value and not self._gather_exact:
            raise ValueError(
                f"The mask-only LM head is not exact for {type(self.base_model).__name__} (the probe forward found "
                "other logits than the full head's), so it cannot be switched on; the full head is used."
            )
        self._gather_ok = bool(value)

    # -- inputs: the active adapter's processor ---------------------------------------------------------------

    @property
    def processor(self) -> SoftMixtureProcessor:
        """The active adapter's query encoder (tokenizer, template layouts, caches)."""
        return self._processors[self.active_adapter]

    def get_processor(self, adapter_name: str | None = None) -> SoftMixtureProcessor:
        """The query encoder of an adapter (the active one by default)."""
        return self._processors[adapter_name or self.active_adapter]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The active adapter's tokenizer (the base model's)."""
        return self.processor.tokenizer

    def encode(
        self,
        subjects: Sequence[str],
        objects: Sequence[str | None] | None = None,
        device: Any = None,
        adapter_names: Sequence[str] | None = None,
        strict: bool = False,
        multi_token: bool = False,
        causal_scoring: str = "prefix",
    ) -> dict[str, Any]:
        """Fill each fact's templates with its subject: one row per (fact, template), see `encode_facts`.

        ``adapter_names`` (one per subject) encodes each fact for its own adapter (the active one by default), so
        that facts of several relations share one batch; run it with ``model(**batch, adapter_names=...)``. An
        object that is not one token is labelled -100 with a warning, or refused with ``strict=True``. Raises
        `QueryTooLongError` for a query longer than `max_query_length`.

        ``multi_token=True`` takes objects of any length: ``[Y]`` gets one mask per object token, the batch gains
        ``target_positions`` and its ``labels`` are ``[B, L]`` (see `peft_softmix.objects.encode_objects`). An
        adapter of a causal LM always encodes so; ``causal_scoring`` ("prefix" or "sentence") says what it scores.
        """
        check_subjects(subjects, "encode")
        names = resolve_adapter_names(adapter_names, None, self.active_adapter, self._processors, len(subjects))
        processors = [self._processors[n] for n in names]
        if multi_token or processors[0].causal:  # a causal LM always scores the object's own tokens
            return encode_objects(
                processors, subjects, objects, device=device, strict=strict, causal_scoring=causal_scoring
            )
        if adapter_names is None:
            return self.processor.encode(subjects, objects, device=device, strict=strict)
        return encode_facts(processors, subjects, objects, device=device, strict=strict)

    @property
    def max_query_length(self) -> int | None:
        """The most tokens a filled template may have with the active adapter (None: no stated limit)."""
        return self.processor.max_query_length

    def query_lengths(self, subjects: Sequence[str]) -> list[int]:
        """For each subject, the token count of its longest filled template (compare with `max_query_length`)."""
        return self.processor.query_lengths(subjects)

    def object_ids(self, objects: Sequence[str | None], strict: bool = False) -> list[int | None]:
        """The token id each object is when it fills ``[Y]`` (None when it is not one token of the tokenizer).

        `encode` labels such objects -100, which the loss skips; ``strict=True`` raises instead, naming them.
        """
        return self.processor.object_ids(objects, strict=strict)

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        roles: torch.Tensor,
        mask_positions: torch.Tensor,
        fact_index: torch.Tensor,
        labels: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
        return_template_log_probs: bool = False,
        return_log_probs: bool = True,
        adapter_names: Sequence[str] | None = None,
        encoded_for: Sequence[str] | None = None,
        target_positions: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SoftMixtureOutput | tuple:
        """Score the mask of every row and mix each fact's rows: log p(y|x) = logsumexp_k(log pi_k + log p_k(y|x)).

        Args:
            input_ids: ``[N, T]`` from `encode`: one row per fact and template.
            attention_mask: ``[N, T]`` from `encode`.
            roles: ``[N, T]`` from `encode` (``roles >= 0``: the row of the adapter's `soft_words` at a template word).
            mask_positions: ``[N]``, the mask of each row.
            fact_index: ``[N]``, the fact of each row.
            labels: ``[B]`` gold object token ids (-100 to ignore); gives ``loss`` (None without labels).
            candidate_mask: ``[V]`` bool, restricts the distribution to these tokens (e.g. LAMA's common vocab).
            return_template_log_probs: also return each row's ``[N, V]`` distribution.
            return_log_probs: False leaves ``log_probs`` out (None). A training step that needs only ``loss`` then
                neither mixes the distributions over the whole vocabulary nor keeps that mixture for a backward pass.
            adapter_names: the adapter of each fact (PEFT's mixed-batch convention); default: the active adapter.
            encoded_for: the adapters the batch was encoded for (`encode` sets it): running it through others is
                refused.
            target_positions: ``[N, L]`` the masks of each row, for objects of any length (``encode(...,
                multi_token=True)``); ``labels`` are then ``[B, L]`` and the output has ``object_log_probs``.
            target_ids: ``[N, L]`` the token each target position scores (a causal LM's batches have them).
            kwargs: ``return_dict`` (False: a tuple), ``output_attentions`` / ``output_hidden_states`` (False only)
                and ``num_items_in_batch`` (the Trainer's count of labelled facts over the batches it accumulates:
                the loss is then their summed -log p divided by it) are accepted; anything else is a TypeError.
        """
        return_dict = check_forward_kwargs(kwargs)
        N = input_ids.shape[0]
        if input_ids.dim() != 2 or fact_index.shape != (N,):
            raise ValueError(
                f"forward takes the [N, T] batches of `encode` (one row per fact and template) with fact_index [N]; "
                f"got input_ids {tuple(input_ids.shape)} and fact_index {tuple(fact_index.shape)}."
            )
        num_facts = (
            len(adapter_names) if adapter_names is not None and not isinstance(adapter_names, str)
            else len(encoded_for) if encoded_for is not None
            else int(labels.shape[0]) if labels is not None
            else None
        )  # fmt: skip
        active = not self._adapters_disabled and bool(self.peft_config)
        if active:
            active_name = self.active_adapter if isinstance(self.active_adapter, str) else None
            names = resolve_adapter_names(adapter_names, encoded_for, active_name, self.peft_config, num_facts)
            encoders = {name: self._encoder(name) for name in dict.fromkeys(names)}
            path = route(encoders, names, roles, fact_index)
        else:
            # the frozen model on the hard templates, each fact's templates weighted alike
            sizes = None
            if encoded_for is not None and all(name in self.prompt_encoder for name in encoded_for):
                sizes = [self._encoder(name).num_templates for name in encoded_for]
            path = hard_route(fact_index, sizes)
        with ExitStack() as stack:
            if path.positions is not None:
                # the model gets token ids; only the embedding table's output changes (see soft_word_embeddings)
                stack.enter_context(
                    soft_word_embeddings(self._embedding_tables, path.put_soft_words, path.positions, input_ids)
                )
                if path.deep_offsets is not None:
                    stack.enter_context(deep_prompt_hooks(self._layers, path.deep_offsets, path.positions))
            where = mask_positions if target_positions is None else target_positions
            if self._gather_ok:
                backbone = cast(nn.Module, find_backbone(self.base_model))
                stack.enter_context(gather_mask_positions(backbone, where))
            logits = self.base_model(input_ids=input_ids, attention_mask=attention_mask).logits
        num_items = kwargs.get("num_items_in_batch")
        if target_positions is not None:
            if candidate_mask is not None:
                raise ValueError("candidate_mask restricts single-token answers; rank objects of any length with "
                                 "peft_model.score_candidates(subjects, candidates).")  # fmt: skip
            # with the mask-only head the logits are already [N, L, V]
            rows = torch.arange(N, device=logits.device)[:, None]
            logits = logits if self._gather_ok else logits[rows, where.to(logits.device)]
            out = object_head(logits, path, labels, return_template_log_probs, num_items, target_ids)
        else:
            # with the mask-only head the logits are already [N, 1, V]
            logits = logits[:, 0] if self._gather_ok else logits[torch.arange(N, device=logits.device), mask_positions]
            out = vocabulary_head(
                logits, path, labels, candidate_mask, return_template_log_probs, return_log_probs, num_items
            )
        return out if return_dict else out.to_tuple()

    def query(
        self,
        subjects: Sequence[str],
        top_k: int = 10,
        return_template_probs: bool = False,
        candidate_ids: Sequence[int] | None = None,
        batch_size: int = 64,
        adapter_names: Sequence[str] | None = None,
        max_tokens: int | None = None,
        strategy: str = DEFAULT_STRATEGY,
        candidates: Sequence[str] | None = None,
        length_normalized: bool = False,
    ) -> list[dict[str, Any]]:
        """The top-k fillers of ``[Y]`` for each subject, best first, through each subject's adapter; answers of up
        to ``max_tokens`` tokens decoded by ``strategy``, or ``candidates`` of any length ranked (see
        `peft_softmix.answers.query_model`, which documents the answer format)."""
        return query_model(
            self, subjects, top_k, return_template_probs, candidate_ids, batch_size, adapter_names, max_tokens,
            strategy, candidates, length_normalized,
        )  # fmt: skip

    def score_candidates(
        self,
        subjects: Sequence[str],
        candidates: Sequence[str],
        adapter_names: Sequence[str] | None = None,
        batch_size: int = 32,
        return_template_log_probs: bool = False,
        causal_scoring: str = "prefix",
    ) -> CandidateScores:
        """log p(c|x) of candidate objects of any length for each subject, one forward pass per candidate length
        (see `peft_softmix.ranking.score_candidates`)."""
        return score_candidates(
            self, subjects, candidates, adapter_names, batch_size, return_template_log_probs, causal_scoring
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: PEFT's ``generate`` hands the call to the base model, which would answer without the soft prompts
        (a causal LM) or has no ``generate`` (a masked LM). A mixture answers through `query`."""
        raise NotImplementedError(
            "generate() would run the base model without the adapter's soft prompts and mixture. Ask through the "
            "adapter instead: model.query(subjects) decodes each subject's answers over the mixture of its templates "
            "(a causal LM: a beam search after the prompt, max_tokens=...), and model.query(subjects, "
            "candidates=[...]) or model.score_candidates(subjects, candidates) ranks given objects."
        )
