"""The causal (decoder-only) LM types that cannot take a mixture of soft prompts, or deep ones, and why.

The generic rules of `architectures` (the token embedding table, the layer stack, the hooks of `hooks`) find the
parts of almost every `AutoModelForCausalLM` type; ``tests/causal_architecture_check.py`` proves it per type on a
tiny random model (behind the "Causal LMs" table of ``docs/supported-architectures.md``). The types here are the
exceptions, each with the reason a user reads in the `UnsupportedArchitectureError`.
"""

from __future__ import annotations

__all__ = ["CAUSAL_CACHE_UNUSABLE", "CAUSAL_DEEP_UNSUPPORTED", "CAUSAL_UNSUPPORTED"]

_REREADS_IDS = (
    "a soft word initialised from its own token already changes the logits (measured on a tiny random model), so "
    "the model reads the token ids again beyond the embedding table's output and a soft word cannot stand in for "
    "its token."
)
_MIXED_STACK = (
    "its layers are of several classes (state-space or linear-attention layers beside attention layers), so the "
    "generic rule, one list of identical blocks, finds no stack that the forward runs."
)
_OTHER_LAYOUT = (
    "its decoder layers receive the hidden states in another layout than [batch, length, hidden] (measured on a "
    "tiny random model: the deep-offset hook finds no such tensor)."
)

# Types whose causal-LM class cannot be given soft words at all.
CAUSAL_UNSUPPORTED: dict[str, str] = {
    "cpmant": "a soft word put into the output of CPM-Ant's token embedding table changes no logit (measured on a "
    "tiny random model): its forward does not take the prompt's embeddings from that output.",
    "inkling2_loop_text": _REREADS_IDS,
    "inkling2_text": _REREADS_IDS,
    "inkling_text": _REREADS_IDS,
    **dict.fromkeys(
        ["musicgen", "musicgen_melody"],
        "MusicGen's decoder reads audio codebooks ([batch x codebooks, length] ids), not a text prompt.",
    ),
    "reformer": "ReformerModelWithLMHead runs a backward pass only in train mode and then only on sequences exactly "
    "as long as its axial position grid, so soft words cannot be trained on a short prompt.",
}

# Types where soft words work but the hidden states entering the layers do not line up with the tokens.
CAUSAL_DEEP_UNSUPPORTED: dict[str, str] = {
    "deepseek_v4": _OTHER_LAYOUT,
    "gemma3n_text": _OTHER_LAYOUT,
    "hy_v4": _OTHER_LAYOUT,
    "git": "the layer stack the generic rule finds is not called by a text-only forward (no layer call counted).",
    "hrm_text": "HRM runs most of its recurrent layer calls without gradient, so offsets at those calls cannot learn "
    "(measured on a tiny random model: no gradient at 6 of its 12 calls).",
    "jamba": _MIXED_STACK,
    "olmo_hybrid": _MIXED_STACK,
    "nemotron_h": "the offsets of its last layer call get no gradient (measured on a tiny random model).",
    "xlm": "XLM keeps each layer's parts in separate lists (attentions, feed-forward networks), so there is no block "
    "whose input is the hidden state entering a layer (measured: offsets at the last call get no gradient).",
    "zamba2": "deep offsets at a position leave later positions unchanged (measured on a tiny random model): the "
    "stack the generic rule finds is not the one the hidden states flow through.",
}

# Types whose key/value cache cannot continue a prompt exactly (measured on tiny random models, the "cache" column
# of docs/architectures_causal.json): their candidates are scored by one full forward per candidate instead.
CAUSAL_CACHE_UNUSABLE: dict[str, str] = {
    "bamba": "cached scores differ from the full forward's by up to 2.8e-04 (tiny random model)",
    "dory": "cached scores differ from the full forward's by up to 9.3e-03 (tiny random model)",
    "falcon_mamba": "cached scores differ from the full forward's by up to 6.8e-01 (tiny random model)",
    "granitemoehybrid": "continuing from its cache fails (ValueError)",
    "jamba": "cached scores differ from the full forward's by up to 2.4e-05 (tiny random model)",
    "mamba": "cached scores differ from the full forward's by up to 6.2e-01 (tiny random model)",
    "mamba2": "cached scores differ from the full forward's by up to 2.2e+00 (tiny random model)",
    "openai-gpt": "its forward returns no key/value cache",
    "prophetnet": "continuing from its cache fails (AssertionError)",
    "recurrent_gemma": "its forward returns no key/value cache",
    "rwkv": "its forward returns no key/value cache",
    "xlm": "its forward returns no key/value cache",
    "xlstm": "continuing from its cache fails (ValueError)",
}
