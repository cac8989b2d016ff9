"""`PeftModelForSoftMixture`: the forward pass of a mixture of soft prompts around a frozen masked LM."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .architectures import check_supported, input_embeddings, layer_stack, max_query_length
from .config import SoftMixtureConfig
from .inputs import candidate_mask as checked_candidate_mask
from .inputs import check_objects, check_query_options, check_subjects
from .layers import (
    SoftPositions,
    count_layer_calls,
    deep_prompt_hooks,
    find_backbone,
    gather_mask_positions,
    soft_word_embeddings,
    tied_embedding_modules,
)
from .model import AdapterLoadError, SoftMixtureModel
from .tokenization import EncodedQuery, TemplateLayout, encode_query, object_token_id, template_layout
from .trust import base_model_name, load_tokenizer, tokenizer_consent

IGNORE_INDEX = -100


@dataclass
class SoftMixtureOutput(ModelOutput):
    """
    Args:
        loss: mean of -log p(y|x) over the examples that have a label (0, with no gradient, if none has one).
        log_probs: ``[B, V]`` log of the mixture distribution over the vocabulary at the mask, unless the forward
            was called with ``return_log_probs=False``.
        template_log_probs: ``[B, K, V]`` each template's log p_k(y|x), when asked for.
        log_weights: ``[K]`` log mixture weights.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    template_log_probs: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None


class QueryTooLongError(ValueError):
    """A filled template has more tokens than the base model has positions."""


@dataclass
class _AdapterRuntime:
    """What an adapter needs at run time besides its tensors (rebuilt from the config, never saved)."""

    tokenizer: PreTrainedTokenizerBase
    layouts: list[TemplateLayout]
    cache: dict[tuple[int, str], EncodedQuery]
    # the same queries as [T, 2] tensors of (input id, role with template words numbered across all templates, i.e.
    # rows of `soft_words`), and objects' token ids: what `encode` collates
    rows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    object_ids: dict[str | None, int | None] = field(default_factory=dict)
    max_length: int | None = None

    def query(self, k: int, subject: str) -> EncodedQuery:
        """Template ``k`` filled with ``subject``, tokenised once per adapter (`encode` and `query_lengths`)."""
        query = self.cache.get((k, subject))
        if query is None:
            query = self.cache[k, subject] = encode_query(self.tokenizer, self.layouts[k], subject)
        return query


class PeftModelForSoftMixture(PeftModel):
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
            self._setup_prompt_encoder(adapter_name)
        except Exception as err:
            del self.peft_config[adapter_name]
            source = getattr(peft_config, "_source_file", None)
            if source and isinstance(err, (ValueError, OSError)) and source not in str(err):
                raise AdapterLoadError(f"{source}: {err}") from err
            raise

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        config = self._softmix_config(adapter_name)
        base = self.base_model
        for param in base.parameters():
            param.requires_grad_(False)
        if not hasattr(self, "prompt_encoder"):
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens = {}
            self._softmix_runtime: dict[str, _AdapterRuntime] = {}
        check_supported(base, deep=bool(config.deep))
        embeddings = input_embeddings(base)
        self.word_embeddings = embeddings
        # every module that looks tokens up in that table (seq2seq models keep one per stack)
        self._embedding_tables = tied_embedding_modules(base, embeddings)
        tokenizer = self._load_tokenizer(config)
        layouts = [template_layout(tokenizer, template) for template in config.templates]
        token_ids = [[list(segment) for segment in layout.segments] for layout in layouts]
        self._check_compatible(config, tokenizer, token_ids, embeddings)
        config.template_token_ids = token_ids
        config.vocab_size = embeddings.num_embeddings
        config.token_dim = embeddings.embedding_dim
        config.tokenizer_class = type(tokenizer).__name__
        config.num_virtual_tokens = sum(layout.num_soft_words for layout in layouts)
        config.num_transformer_submodules = 1

        probe = self._probe(base, tokenizer, layouts[0], want_layers=bool(config.deep))
        if config.deep:
            depth = probe["depth"]
            wanted = depth if config.deep is True else int(config.deep)
            if wanted > depth:
                raise ValueError(f"deep={config.deep} asks for more layers than {type(base).__name__} has ({depth}).")
            config.num_deep_layers = wanted
        else:
            config.num_deep_layers = 0
        config.num_layers = probe.get("depth")

        encoder = SoftMixtureModel(config, embeddings, layouts, deep_hidden_size=probe.get("hidden_size", 0))
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens)
        self._softmix_runtime[adapter_name] = _AdapterRuntime(
            tokenizer, layouts, {}, max_length=max_query_length(base, tokenizer)
        )
        self._layers = probe.get("layers", getattr(self, "_layers", []))
        self._gather_ok = probe["gather_ok"]

    def _load_tokenizer(self, config: SoftMixtureConfig) -> PreTrainedTokenizerBase:
        # never runs code; a loaded adapter gets its base model's tokenizer unless the user passed tokenizer=
        return load_tokenizer(config, base_model_name(self.base_model))

    def _check_compatible(self, config, tokenizer, token_ids, embeddings: nn.Embedding) -> None:
        model_name = type(self.base_model).__name__
        base_name = getattr(getattr(self.base_model, "config", None), "name_or_path", "") or "unnamed"
        trained_for = (
            f"the base model {config.base_model_name_or_path or 'unnamed'!r} (vocabulary {config.vocab_size}, "
            f"embedding width {config.token_dim})"
        )
        given = (
            f"{model_name} {base_name!r} (vocabulary {embeddings.num_embeddings}, embedding width "
            f"{embeddings.embedding_dim})"
        )
        if (config.vocab_size is not None and config.vocab_size != embeddings.num_embeddings) or (
            config.token_dim is not None and config.token_dim != embeddings.embedding_dim
        ):
            raise AdapterLoadError(
                f"This adapter was trained for {trained_for} but is being applied to {given}. Load it on the base "
                "model it was trained for."
            )
        if config.template_token_ids is not None and config.template_token_ids != token_ids:
            saved, now = config.template_token_ids, token_ids
            k = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
            template = config.templates[k] if k < len(config.templates) else None
            raise AdapterLoadError(
                f"Template {k} {template!r} was tokenised as {saved[k] if k < len(saved) else None} when this adapter "
                f"was trained (with a {config.tokenizer_class}), but as {now[k] if k < len(now) else None} by the "
                f"tokenizer {type(tokenizer).__name__} {tokenizer.name_or_path!r}: either the templates were edited "
                "after training or this is another tokenizer, and the soft words would land on the wrong tokens. "
                "Restore the trained templates and use the base model's own tokenizer."
            )
        if len(tokenizer) > embeddings.num_embeddings:
            raise AdapterLoadError(
                f"The tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but {model_name}'s embedding "
                f"table only {embeddings.num_embeddings}: they do not belong together."
            )

    def _probe(self, base: nn.Module, tokenizer, layout: TemplateLayout, want_layers: bool) -> dict[str, Any]:
        """One tiny forward pass to measure the layer depth and check that the mask-only head is exact."""
        query = encode_query(tokenizer, layout, "a")
        device = self.embedding_device
        input_ids = torch.tensor([query.input_ids], device=device)
        kwargs = {"attention_mask": torch.ones_like(input_ids)}
        info: dict[str, Any] = {}
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad():
                layers = layer_stack(base) if want_layers else []
                with count_layer_calls(layers) as counter:
                    full = base(input_ids=input_ids, **kwargs).logits[0, query.mask_position].float()
                if want_layers:
                    if not counter.calls:
                        raise ValueError(
                            f"Could not find the transformer layers of {type(base).__name__} for deep prompts; "
                            "use deep=False."
                        )
                    info.update(layers=layers, depth=counter.calls, hidden_size=counter.hidden_size)
                backbone = find_backbone(base)
                info["gather_ok"] = False
                if backbone is not None:
                    try:
                        with gather_mask_positions(backbone, torch.tensor([query.mask_position], device=device)):
                            picked = base(input_ids=input_ids, **kwargs).logits
                        info["gather_ok"] = picked.shape[1] == 1 and torch.allclose(
                            picked[0, 0].float(), full, atol=1e-4, rtol=1e-4
                        )
                    except Exception:  # an exotic head: fall back to the full logits, which is always right
                        info["gather_ok"] = False
        finally:
            base.train(was_training)
        return info

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

    # -- inputs ----------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._softmix_runtime[self.active_adapter].tokenizer

    def encode(
        self, subjects: Sequence[str], objects: Sequence[str | None] | None = None, device: Any = None
    ) -> dict[str, torch.Tensor]:
        """Fill every template with every subject: tensors of shape ``[B, K, T]`` plus mask positions and labels.

        ``roles[b, k, t]`` is the row of the adapter's `soft_words` at a template word, or the token's kind (< 0:
        `HARD`, `SUBJECT`, `MASK`) elsewhere. ``labels[b]`` is the object's token id, or -100 when it is not one
        token (or not given).
        """
        check_subjects(subjects, "encode")
        check_objects(subjects, objects, "encode")
        runtime = self._softmix_runtime[self.active_adapter]
        tokenizer = runtime.tokenizer
        queries: list[EncodedQuery] = []
        rows: list[torch.Tensor] = []
        for subject in subjects:
            for k in range(len(runtime.layouts)):
                key = (k, subject)
                row = runtime.rows.get(key)
                if row is None:
                    query = runtime.query(k, subject)
                    # template words numbered as rows of `soft_words` here, once per query, not in every forward
                    start = sum(earlier.num_soft_words for earlier in runtime.layouts[:k])
                    numbered = [role + start if role >= 0 else role for role in query.roles]
                    row = runtime.rows[key] = torch.tensor([query.input_ids, numbered], dtype=torch.long).T
                queries.append(runtime.cache[key])
                rows.append(row)
        B, K = len(subjects), len(runtime.layouts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # cached rows padded in one call: collating row by row in Python costs more than a training step on a GPU
        padded = pad_sequence(rows, batch_first=True, padding_value=-1)  # [B * K, T, 2]; role -1 = hard
        T = padded.shape[1]
        lengths = torch.tensor([len(q.input_ids) for q in queries])
        if runtime.max_length is not None and len(queries) and int(lengths.max()) > runtime.max_length:
            self._raise_too_long(queries, subjects, runtime.max_length)
        attention_mask = (torch.arange(T) < lengths[:, None]).long()
        input_ids = padded[..., 0].masked_fill(attention_mask == 0, pad)
        roles = padded[..., 1].contiguous()
        mask_positions = torch.tensor([q.mask_position for q in queries])
        labels = torch.full((B,), IGNORE_INDEX, dtype=torch.long)
        if objects is not None:
            for b, token in enumerate(self.object_ids(objects)):
                labels[b] = IGNORE_INDEX if token is None else token
        batch = {
            "input_ids": input_ids.view(B, K, T),
            "attention_mask": attention_mask.view(B, K, T),
            "roles": roles.view(B, K, T),
            "mask_positions": mask_positions.view(B, K),
            "labels": labels,
        }
        if device is not None:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
        return batch

    @property
    def max_query_length(self) -> int | None:
        """The most tokens a filled template may have with the active adapter (None: no stated limit)."""
        return self._softmix_runtime[self.active_adapter].max_length

    def query_lengths(self, subjects: Sequence[str]) -> list[int]:
        """For each subject, the token count of its longest filled template (compare with `max_query_length`)."""
        check_subjects(subjects, "query_lengths", allow_empty=True)
        runtime = self._softmix_runtime[self.active_adapter]
        lengths = []
        for subject in subjects:
            longest = 0
            for k in range(len(runtime.layouts)):
                longest = max(longest, len(runtime.query(k, subject).input_ids))
            lengths.append(longest)
        return lengths

    def _raise_too_long(self, queries: list[EncodedQuery], subjects: Sequence[str], limit: int) -> None:
        K = len(self._softmix_runtime[self.active_adapter].layouts)
        i = max(range(len(queries)), key=lambda n: len(queries[n].input_ids))
        templates = self._softmix_config().templates
        raise QueryTooLongError(
            f"The query for subject {subjects[i // K]!r} with template {templates[i % K]!r} is "
            f"{len(queries[i].input_ids)} tokens long, but {type(self.base_model).__name__} takes at most {limit}. "
            "Leave such facts out (`query_lengths(subjects)` gives each subject's longest query; "
            "examples/train_trex.py drops and counts them) or shorten the template."
        )

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        roles: torch.Tensor,
        mask_positions: torch.Tensor,
        labels: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
        return_template_log_probs: bool = False,
        return_log_probs: bool = True,
        **kwargs: Any,
    ) -> SoftMixtureOutput:
        """Score the mask of every filled template and mix: log p(y|x) = logsumexp_k(log pi_k + log p_k(y|x)).

        Args:
            input_ids: ``[B, K, T]`` from `encode`.
            attention_mask: ``[B, K, T]`` from `encode`.
            roles: ``[B, K, T]`` from `encode` (``roles >= 0``: the row of `soft_words` at a template word).
            mask_positions: ``[B, K]``.
            labels: ``[B]`` gold object token ids (-100 to ignore); gives ``loss``.
            candidate_mask: ``[V]`` bool, restricts the distribution to these tokens (e.g. LAMA's common vocab).
            return_template_log_probs: also return each template's ``[B, K, V]`` distribution.
            return_log_probs: False leaves ``log_probs`` out (None). A training step that needs only ``loss`` then
                neither mixes K distributions over the whole vocabulary (the loss mixes the K gold log-probs only)
                nor keeps that mixture for a backward pass.
        """
        B, K, T = input_ids.shape
        encoder = self._encoder()
        if encoder.num_templates != K:
            raise ValueError(
                f"The batch has {K} templates per fact but adapter '{self.active_adapter}' has "
                f"{encoder.num_templates}; encode it with this adapter active."
            )
        flat_ids = input_ids.reshape(B * K, T)
        flat_mask = mask_positions.reshape(B * K)
        active = not self._adapters_disabled
        with ExitStack() as stack:
            if active:
                positions = SoftPositions.of(roles.reshape(B * K, T))
                if positions.index.numel() > B * encoder.num_soft_words:
                    # a count known on the host already (it sized the index). Fewer is fine: a template stretch that
                    # tokenises differently next to a subject keeps its hard words. More means soft words this
                    # adapter does not have, which would fail inside torch (a device-side assert on a GPU)
                    raise ValueError(
                        f"The batch's queries hold {positions.index.numel()} template words, more than {B} facts "
                        f"can hold with adapter '{self.active_adapter}' ({B * encoder.num_soft_words}): the batch was "
                        "encoded with another adapter's templates (or built by hand); encode it with this adapter "
                        "active."
                    )
                # the model gets token ids; only the embedding table's output changes (see soft_word_embeddings)
                stack.enter_context(soft_word_embeddings(self._embedding_tables, encoder, positions, flat_ids))
                if encoder.deep_offsets is not None:
                    stack.enter_context(deep_prompt_hooks(self._layers, encoder.deep_offsets, positions))
            if self._gather_ok:
                stack.enter_context(gather_mask_positions(cast(nn.Module, find_backbone(self.base_model)), flat_mask))
            logits = self.base_model(input_ids=flat_ids, attention_mask=attention_mask.reshape(B * K, T)).logits
        # with the mask-only head the logits are already [N, 1, V]
        logits = logits[:, 0] if self._gather_ok else logits[torch.arange(B * K, device=logits.device), flat_mask]
        logits = logits.float()
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask.to(logits.device), float("-inf"))
        template_log_probs = torch.log_softmax(logits, dim=-1).view(B, K, -1)
        log_weights = encoder.log_weights() if active else torch.full((K,), -math.log(K))
        log_weights = log_weights.to(template_log_probs.device)
        log_probs = mix_templates(template_log_probs, log_weights) if return_log_probs else None
        loss = None
        if labels is not None:
            keep = labels != IGNORE_INDEX
            # mixed from each template's gold log-prob (= log_probs at the label): the backward pass then touches
            # [B, K] values, not the [B, K, V] logsumexp. nll_loss gives unlabelled rows 0 (selecting them would
            # wait for the GPU), so no -inf reaches their logsumexp to turn a zero gradient into NaN; a batch
            # without any labelled row has loss 0 and no gradient. The fewer small kernels, the better: at K = 1
            # on a GPU the step is launch-bound.
            per_row_labels = labels if K == 1 else labels.repeat_interleave(K)
            nll = F.nll_loss(
                template_log_probs.view(B * K, -1), per_row_labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            # one template is its own mixture; with more, an unlabelled row mixes zeros into log(sum pi), 0 only up to
            # rounding: masked, so that it adds exactly nothing
            total = nll.sum() if K == 1 else -(mix_templates(-nll.view(B, K), log_weights) * keep).sum()
            loss = total / keep.sum().clamp(min=1)
        return SoftMixtureOutput(
            loss=loss,
            log_probs=log_probs,
            template_log_probs=template_log_probs if return_template_log_probs else None,
            log_weights=log_weights,
        )

    @torch.inference_mode()
    def query(
        self,
        subjects: Sequence[str],
        top_k: int = 10,
        return_template_probs: bool = False,
        candidate_ids: Sequence[int] | None = None,
        batch_size: int = 64,
    ) -> list[dict[str, Any]]:
        """The top-k fillers of ``[Y]`` for each subject, with their mixture probabilities.

        Returns one dict per subject: ``{"subject", "predictions": [(token, prob), ...]}`` and, with
        ``return_template_probs``, ``"templates": [{"template", "weight", "predictions"}, ...]``. ``subjects`` is a
        list (a bare string is refused); ``top_k`` and ``batch_size`` are >= 1; ``candidate_ids`` are token ids.
        """
        check_subjects(subjects, "query", allow_empty=True)
        check_query_options(top_k, batch_size)
        device = self.embedding_device
        candidate_mask = checked_candidate_mask(candidate_ids, self._vocab_size, device)
        was_training = self.training
        self.eval()
        tokenizer = self.tokenizer
        runtime = self._softmix_runtime[self.active_adapter]

        def top(log_probs: torch.Tensor) -> list[tuple[str, float]]:
            values, ids = log_probs.topk(min(top_k, log_probs.shape[-1]))
            tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
            return [(token, float(v.exp())) for token, v in zip(tokens, values)]

        results: list[dict[str, Any]] = []
        try:
            for start in range(0, len(subjects), batch_size):
                chunk = list(subjects[start : start + batch_size])
                batch = self.encode(chunk, device=device)
                batch.pop("labels")
                out = self(**batch, candidate_mask=candidate_mask, return_template_log_probs=return_template_probs)
                weights = out.log_weights.exp().tolist()
                for b, subject in enumerate(chunk):
                    item: dict[str, Any] = {"subject": subject, "predictions": top(out.log_probs[b])}
                    if return_template_probs:
                        item["templates"] = [
                            {
                                "template": layout.template,
                                "weight": weights[k],
                                "predictions": top(out.template_log_probs[b, k]),
                            }
                            for k, layout in enumerate(runtime.layouts)
                        ]
                    results.append(item)
        finally:
            self.train(was_training)
        return results

    def object_ids(self, objects: Sequence[str | None], strict: bool = False) -> list[int | None]:
        """The token id each object is when it fills ``[Y]`` (None when it is not one token of the tokenizer).

        `encode` labels such objects -100, which the loss skips; ``strict=True`` raises instead, naming them.
        """
        tokenizer = self.tokenizer
        cache = self._softmix_runtime[self.active_adapter].object_ids
        for obj in objects:
            if obj not in cache:
                cache[obj] = object_token_id(tokenizer, obj) if obj is not None else None
        ids = [cache[obj] for obj in objects]
        if strict:
            bad = list(dict.fromkeys(obj for obj, token in zip(objects, ids) if token is None))
            if bad:
                more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                shown = ", ".join(repr(obj) for obj in bad[:10]) + more
                raise ValueError(
                    f"{len(bad)} object(s) are not one token of {type(tokenizer).__name__} "
                    f"({tokenizer.name_or_path!r}), so a single [Y] mask cannot produce them: {shown}. Drop those "
                    "facts first, e.g. with peft_softmix.facts.filter_single_token."
                )
        return ids

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

    # -- saving and loading ----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:  # type: ignore[override]
        """Save the adapter files atomically: a crash mid-save leaves the previous files intact."""
        if not kwargs.get("is_main_process", True):
            return
        if kwargs.get("safe_serialization") is False:
            raise ValueError(
                "peft_softmix saves adapters only as safetensors, and loads only those (a pickled adapter_model.bin "
                "can run code when loaded); drop safe_serialization=False."
            )
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory.")
        for name in kwargs.get("selected_adapters") or list(self.peft_config):
            self._encoder(name).check_savable(name)  # never write a file the loader would refuse
        parent = os.path.dirname(os.path.abspath(save_directory))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".softmix-save-", dir=parent)
        try:
            super().save_pretrained(staging, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            for root, _, files in os.walk(staging):
                target_dir = os.path.join(save_directory, os.path.relpath(root, staging))
                os.makedirs(target_dir, exist_ok=True)
                for name in files:
                    os.replace(os.path.join(root, name), os.path.join(target_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load_adapter(  # type: ignore[override]
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *args: Any, **kwargs: Any
    ):
        """Like `PeftModel.load_adapter`; ``is_trainable=True`` loads the adapter ready to train further.

        ``tokenizer=`` (a name, folder or tokenizer object) is the user's consent to a tokenizer other than the
        base model's, which the adapter's config may name but not choose (see peft_softmix.trust).
        """
        consent = kwargs.pop("tokenizer", None)
        folder = os.fspath(model_id)
        if kwargs.get("subfolder"):
            folder = os.path.join(folder, kwargs["subfolder"])
        weights_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        _check_adapter_files(os.fspath(model_id), folder, read_config=adapter_name not in self.peft_config, **kwargs)
        added = adapter_name not in self.peft_config
        try:
            # PEFT refuses is_trainable for prompt-learning methods; ours resumes fine, so it is applied after loading
            with tokenizer_consent(consent):
                result = super().load_adapter(model_id, adapter_name, False, *args, **kwargs)
        except Exception as err:
            if added:  # never leave behind an adapter whose weights did not load
                self._forget_adapter(adapter_name)
            if isinstance(err, AdapterLoadError):
                if folder in str(err):
                    raise
                raise AdapterLoadError(f"{weights_file}: {err}") from None
            if "safetensors" in type(err).__module__ or "Safetensor" in type(err).__name__ or "deserializ" in str(err):
                raise AdapterLoadError(
                    f"{weights_file} cannot be read ({err}); the file is truncated or corrupted. Save the adapter "
                    "again or download it afresh."
                ) from None
            raise
        if is_trainable:
            self._make_trainable(adapter_name)
        return result

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

    def _forget_adapter(self, adapter_name: str) -> None:
        self.peft_config.pop(adapter_name, None)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        self._softmix_runtime.pop(adapter_name, None)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ):
        """Like `PeftModel.from_pretrained`, and ``is_trainable=True`` resumes training the adapter.

        ``tokenizer=`` (a name, folder or tokenizer object) is the user's consent to a tokenizer other than the
        base model's, which the adapter's config may name but not choose (see peft_softmix.trust).
        """
        folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else os.fspath(model_id)
        _check_adapter_files(os.fspath(model_id), folder, read_config=kwargs.get("config") is None, **kwargs)
        with tokenizer_consent(kwargs.pop("tokenizer", None)):
            peft_model = super().from_pretrained(model, model_id, adapter_name, is_trainable=False, **kwargs)
        if is_trainable:
            peft_model._make_trainable(adapter_name)
        return peft_model

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        max_shard_size: Any = None,
    ) -> Any:
        """Upload the adapter files that `save_pretrained` writes (weights, config, model card) to a Hub repo.

        transformers' `push_to_hub` would replace our model card with a generic one that neither says
        `import peft_softmix` nor carries the tags. ``max_shard_size`` is accepted and ignored: the adapter is tiny.
        """
        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir)
            if tags:
                card = ModelCard.load(os.path.join(tmp_dir, "README.md"))
                card.data.tags = sorted(set(card.data.tags or []) | set(tags))
                card.save(os.path.join(tmp_dir, "README.md"))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp_dir, name))
                for name in sorted(os.listdir(tmp_dir))
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or "Upload soft-prompt mixture adapter",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    def _get_peft_specific_model_tags(self) -> list[str]:
        return ["peft", "peft_softmix", "soft-prompts", "mixture-of-soft-prompts", "fill-mask", "lama"]

    def create_or_update_model_card(self, output_dir: str) -> None:
        super().create_or_update_model_card(output_dir)
        path = os.path.join(output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if "import peft_softmix" in card:
            return
        config = self.active_peft_config
        templates = "\n".join(f"- `{t}`" for t in config.templates)
        usage = f"""
## Using this adapter

A mixture of {len(config.templates)} soft prompts (Qin & Eisner, NAACL 2021) for a frozen masked LM, made with
[peft_softmix](https://pypi.org/project/peft-softmix/). Import `peft_softmix` first: it registers the method with PEFT.

```python
import peft_softmix  # registers SOFT_MIXTURE with PEFT
from peft import PeftModel
from transformers import AutoModelForMaskedLM

base = AutoModelForMaskedLM.from_pretrained("{config.base_model_name_or_path}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
print(model.query(["Dante"], top_k=5))
```

Templates (deep prompts: {bool(config.num_deep_layers)}):
{templates}
"""
        with open(path, "w", encoding="utf-8") as f:
            f.write(card.rstrip() + "\n" + usage)


def mix_templates(per_template: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k(log pi_k + per_template[:, k])`` for ``per_template`` of shape ``[B, K, ...]``.

    One template is its own mixture (``log pi = 0`` exactly): returned as is, which spares a launch-bound GPU step
    the logsumexp kernels forward and backward.
    """
    if per_template.shape[1] == 1:
        return per_template[:, 0]
    shape = (1, -1) + (1,) * (per_template.dim() - 2)
    return torch.logsumexp(per_template + log_weights.view(shape), dim=1)


def _check_adapter_files(model_id: str, folder: str, read_config: bool, **kwargs: Any) -> None:
    """Fail early, naming the file, where PEFT would raise an unexplained error or fall back to a pickle."""
    weights_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isdir(folder):
        config_file = os.path.join(folder, CONFIG_NAME)
        if read_config and os.path.isfile(config_file):
            # PEFT parses the file first and reports bad JSON without its name
            SoftMixtureConfig.from_json_file(config_file)
        if not os.path.isfile(weights_file):
            pickled = os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
            raise AdapterLoadError(
                f"{weights_file} is missing"
                + (
                    f" (there is an {WEIGHTS_NAME}, which peft_softmix never loads: pickle files can run code)"
                    if pickled
                    else ""
                )
                + ". Save the adapter again with save_pretrained, which writes safetensors."
            )
        return
    # A Hub id: fetch the safetensors file first, so that PEFT never falls back to a pickled adapter_model.bin.
    hub_kwargs = {
        key: kwargs[key]
        for key in ("subfolder", "revision", "cache_dir", "token", "local_files_only")
        if kwargs.get(key) is not None
    }
    try:
        hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
    except Exception as err:
        raise AdapterLoadError(
            f"{model_id!r} is neither a local adapter folder nor a Hub repository with {SAFETENSORS_WEIGHTS_NAME} "
            f"({type(err).__name__}: {err}). peft_softmix loads adapters only from safetensors, never from a pickled "
            f"{WEIGHTS_NAME}."
        ) from err
