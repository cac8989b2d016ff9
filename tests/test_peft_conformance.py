"""PEFT's own common tests (`PeftCommonTester`, from the installed PEFT's sdist) run against SOFT_MIXTURE.

Shallow and deep mixtures, on the probe LM (a BERT) and a tiny RoBERTa. Each PEFT test that applies runs as PEFT
wrote it; one that cannot apply is skipped with its reason (PEFT's own skip where PEFT makes it); docs/conformance.md
lists them. The suite is not in this repository: see tests/peft_upstream.py for where it comes from.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from factories import bpe_tokenizer, special_token_ids, tiny_config, tiny_model
from peft import get_peft_model
from peft_upstream import ENV_REQUIRED, find_tests_dir, load_common
from transformers import AutoModelForMaskedLM, AutoTokenizer

import peft_softmix  # noqa: F401  (registers SOFT_MIXTURE with PEFT)
from peft_softmix import SoftMixtureConfig

_folder, _why_missing = find_tests_dir()
if _folder is None and os.environ.get(ENV_REQUIRED) == "1":
    raise RuntimeError(f"{ENV_REQUIRED}=1 but {_why_missing}")
common = load_common(_folder) if _folder is not None else None
needs_suite = pytest.mark.skipif(common is None, reason=_why_missing)
PeftCommonTester = common.PeftCommonTester if common is not None else object

PROBE_LM = Path(__file__).resolve().parents[1] / "examples" / "probe_lm"
TEMPLATES = ["[X] was born in [Y] .", "[X] is a citizen of [Y] ."]
SUBJECTS = ["Dante", "Paris"]
CONFIGS = {"shallow": {"templates": TEMPLATES}, "deep": {"templates": TEMPLATES, "deep": True}}

# the reasons docs/conformance.md lists (PEFT's own skips are worded by PEFT)
NO_PICKLE = (
    "peft_softmix saves and loads safetensors only (a pickled adapter_model.bin can run code when loaded): "
    "save_pretrained(safe_serialization=False) is refused by design, see test_pickle_save_is_refused"
)
NO_INJECTION = (
    "inject_adapter_in_model refuses every prompt-learning method in PEFT ('create_and_replace does not support "
    "prompt learning'), PEFT's own prompt tuning included; test_low_cpu_mem_usage_loading runs the rest"
)
NO_EMBEDS = (
    "a mixture places its soft words by the template layout of token ids (input_ids, roles); inputs_embeds alone "
    "carry no template to query through"
)
NO_TENSOR_OUTPUT = (
    "PEFT's test compares outputs with torch.allclose: generate() scores when the model has generate (every PeftModel "
    "does, forwarding to the base; a masked LM has none), else model(**inputs), which for a transformers model is a "
    "ModelOutput that allclose refuses; PEFT runs it on generative models only. The disabled adapter is tested in "
    "tests/test_core.py (test_disable_adapter_is_the_uniform_hard_mixture)"
)
NO_GENERATE = (
    "generate() is refused with a message naming query(): PEFT hands it to the base model, which would answer "
    "without the soft prompts; tests/test_causal.py checks the refusal and the decoding query() does instead"
)
NO_MIXED_BATCH = "per-row adapter_names apply to LoRA-like layers; a prompt-learning adapter is one per batch"


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> str:
    """A tiny random RoBERTa for masked LM with its byte-level BPE tokenizer, saved like a Hub checkpoint."""
    folder = Path(bpe_tokenizer(tmp_path_factory.mktemp("conformance-roberta")))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = special_token_ids(tokenizer)
    config = tiny_config("roberta", len(tokenizer), ids["pad_token_id"], ids["bos_token_id"], ids["eos_token_id"])
    tiny_model(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=["probe_lm", "roberta"])
def model_id(request) -> str:
    return str(PROBE_LM) if request.param == "probe_lm" else request.getfixturevalue("roberta_dir")


@pytest.fixture(params=sorted(CONFIGS))
def config_kwargs(request) -> dict:
    return dict(CONFIGS[request.param])


@needs_suite
class TestSoftMixtureConformance(PeftCommonTester):  # type: ignore[misc, valid-type]
    """Each test hands PEFT's `_test_*` method a model folder, `SoftMixtureConfig` and its keyword arguments."""

    transformers_class = AutoModelForMaskedLM
    torch_device = "cpu"
    _batches: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}

    @pytest.fixture(autouse=True)
    def _current(self, model_id, config_kwargs):
        # PEFT calls prepare_inputs_for_testing() without arguments: it needs to know the model of the test
        self.model_id, self.config_kwargs = model_id, config_kwargs

    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        """A batch of the current model's mixture for two subjects, inputs only (no labels), as in PEFT's suites."""
        key = (self.model_id, bool(self.config_kwargs.get("deep")))
        if key not in self._batches:
            base = AutoModelForMaskedLM.from_pretrained(self.model_id)
            peft_model = get_peft_model(base, SoftMixtureConfig(**self.config_kwargs))
            batch = peft_model.encode(SUBJECTS)
            batch.pop("labels", None)
            self._batches[key] = batch
        return dict(self._batches[key])

    # -- PEFT tests that apply, run as PEFT wrote them --------------------------------------------------------

    def test_model_attr(self, model_id, config_kwargs):
        self._test_model_attr(model_id, SoftMixtureConfig, config_kwargs)

    def test_adapter_name(self, model_id, config_kwargs):
        self._test_adapter_name(model_id, SoftMixtureConfig, config_kwargs)

    def test_prepare_for_training(self, model_id, config_kwargs):
        self._test_prepare_for_training(model_id, SoftMixtureConfig, config_kwargs)

    def test_save_pretrained(self, model_id, config_kwargs):
        self._test_save_pretrained(model_id, SoftMixtureConfig, config_kwargs)

    def test_save_pretrained_selected_adapters(self, model_id, config_kwargs):
        self._test_save_pretrained_selected_adapters(model_id, SoftMixtureConfig, config_kwargs)

    def test_save_pretrained_adapter_name_substring(self, model_id, config_kwargs):
        self._test_save_pretrained_adapter_name_substring(model_id, SoftMixtureConfig, config_kwargs)

    def test_from_pretrained_config_construction(self, model_id, config_kwargs):
        self._test_from_pretrained_config_construction(model_id, SoftMixtureConfig, config_kwargs)

    def test_load_multiple_adapters(self, model_id, config_kwargs):
        self._test_load_multiple_adapters(model_id, SoftMixtureConfig, config_kwargs)

    def test_training(self, model_id, config_kwargs):
        self._test_training(model_id, SoftMixtureConfig, config_kwargs)

    def test_training_prompt_learning_tasks(self, model_id, config_kwargs):
        self._test_training_prompt_learning_tasks(model_id, SoftMixtureConfig, config_kwargs)

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_gradient_checkpointing(self, model_id, config_kwargs, use_reentrant):
        self._test_training_gradient_checkpointing(
            model_id, SoftMixtureConfig, config_kwargs, use_reentrant=use_reentrant
        )

    def test_inference_safetensors(self, model_id, config_kwargs):
        self._test_inference_safetensors(model_id, SoftMixtureConfig, config_kwargs)

    def test_peft_model_device_map(self, model_id, config_kwargs):
        self._test_peft_model_device_map(model_id, SoftMixtureConfig, config_kwargs)

    def test_delete_unknown_adapter_raises(self, model_id, config_kwargs):
        self._test_delete_unknown_adapter_raises(model_id, SoftMixtureConfig, config_kwargs)

    def test_get_base_model_state_dict(self, model_id, config_kwargs):
        self._test_get_base_model_state_dict(model_id, SoftMixtureConfig, config_kwargs)

    # -- PEFT tests whose own skips apply to every prompt-learning method --------------------------------------

    @pytest.mark.parametrize(
        "name",
        [
            "merge_layers",
            "merge_layers_fp16",
            "merge_layers_nan",
            "merge_layers_multi",
            "merge_layers_is_idempotent",
            "safe_merge",
            "mixed_adapter_batches",
            "training_layer_indexing",
            "weighted_combination_of_adapters",
            "adding_multiple_adapters_with_bias_raises",
        ],
    )
    def test_skipped_by_peft(self, name, model_id, config_kwargs):
        getattr(self, f"_test_{name}")(model_id, SoftMixtureConfig, config_kwargs)
        pytest.fail(f"PEFT's _test_{name} no longer skips prompt-learning methods: add it to the tests that run.")

    def test_add_adapter_no_autocast_adapter_dtype(self, model_id, config_kwargs):
        self._test_add_adapter_no_autocast_adapter_dtype(model_id, SoftMixtureConfig, config_kwargs, torch.bfloat16)
        pytest.fail("PEFT's _test_add_adapter_no_autocast_adapter_dtype no longer skips prompt learning: run it.")

    # -- PEFT tests that run the base model on our batches (rows it takes as they are) --------------------------

    def test_unload_adapter(self, model_id, config_kwargs):
        # PEFT's test runs the base model on the PEFT model's inputs first, then expects unload() to be refused
        self._test_unload_adapter(model_id, SoftMixtureConfig, config_kwargs)

    def test_delete_adapter(self, model_id, config_kwargs):
        self._test_delete_adapter(model_id, SoftMixtureConfig, config_kwargs)

    def test_delete_inactive_adapter(self, model_id, config_kwargs):
        self._test_delete_inactive_adapter(model_id, SoftMixtureConfig, config_kwargs)

    # -- PEFT tests that cannot apply as written ---------------------------------------------------------------

    def test_disable_adapter(self, model_id, config_kwargs):
        pytest.skip(NO_TENSOR_OUTPUT)

    def test_save_pretrained_pickle(self, model_id, config_kwargs):
        pytest.skip(NO_PICKLE)

    def test_pickle_save_is_refused(self, model_id, config_kwargs):
        """The documented exception: PEFT's pickle variant of save_pretrained is refused, naming the fix."""
        with pytest.raises(ValueError, match="safetensors") as refusal:
            self._test_save_pretrained(model_id, SoftMixtureConfig, config_kwargs, safe_serialization=False)
        assert "drop safe_serialization=False" in str(refusal.value)
        with pytest.raises(ValueError, match="safetensors"):
            self._test_save_pretrained_selected_adapters(
                model_id, SoftMixtureConfig, config_kwargs, safe_serialization=False
            )

    def test_load_model_low_cpu_mem_usage_injection(self, model_id, config_kwargs):
        pytest.skip(NO_INJECTION)

    def test_low_cpu_mem_usage_loading(self, model_id, config_kwargs):
        """PEFT's low-CPU-memory test up to its direct injection: from_pretrained and load_adapter with
        ``low_cpu_mem_usage=True`` pass PEFT's checks (parameters on the device); the injection part then stops as it
        does for PEFT's own prompt tuning: on ``tuner_cls.uses_shared_state``, an attribute of `BaseTuner` that
        prompt encoders (PEFT's `PromptEmbedding` too) do not have, or on inject_adapter_in_model's refusal."""
        with pytest.raises((AttributeError, ValueError), match="uses_shared_state|does not support prompt learning"):
            self._test_load_model_low_cpu_mem_usage(model_id, SoftMixtureConfig, config_kwargs)

    def test_passing_input_embeds_works(self, model_id, config_kwargs):
        pytest.skip(NO_EMBEDS)

    def test_generate(self, model_id, config_kwargs):
        pytest.skip(NO_GENERATE)

    def test_lora_conversion(self, model_id, config_kwargs):
        # PEFT's test returns early (it passes without checking anything) for every prompt-learning method
        base = AutoModelForMaskedLM.from_pretrained(model_id)
        model = get_peft_model(base, SoftMixtureConfig(**config_kwargs))
        assert not model.supports_lora_conversion()
        pytest.skip("PEFT: supports_lora_conversion() is False for prompt-learning methods (not additive weights)")


# -- where the suite comes from (these run without it) ----------------------------------------------------------


def test_a_suite_of_another_peft_version_is_refused(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "testing_common.py").write_text("", encoding="utf-8")
    (tmp_path / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.0.1\n", encoding="utf-8")
    monkeypatch.setenv("PEFT_TESTS_DIR", str(tmp_path))
    folder, why = find_tests_dir()
    assert folder is None
    assert "peft 0.0.1" in why and f"peft {version('peft')} is installed" in why and "peft_upstream.py fetch" in why


def test_a_missing_suite_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_TESTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, why = find_tests_dir()
    assert folder is None
    assert "python tests/peft_upstream.py fetch" in why and f"peft=={version('peft')}" in why


def test_the_stand_ins_leave_no_trace():
    """diffusers/datasets stand-ins exist only while PEFT's suite is imported: nothing else may see them."""
    import sys
    from importlib.util import find_spec

    for name in ("diffusers", "datasets"):
        if find_spec(name) is None:
            assert name not in sys.modules
