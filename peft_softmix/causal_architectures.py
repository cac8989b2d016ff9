"""The causal (decoder-only) LM types that cannot take a mixture of soft prompts, or deep ones, and why.

The generic rules of `architectures` (the token embedding table, the layer stack, the hooks of `hooks`) find the
parts of almost every `AutoModelForCausalLM` type; ``tests/causal_architecture_check.py`` proves it per type on a
tiny random model (behind the "Causal LMs" table of ``docs/supported-architectures.md``). The types here are the
exceptions, each with the reason a user reads in the `UnsupportedArchitectureError`.
"""

from __future__ import annotations

__all__ = ["CAUSAL_DEEP_UNSUPPORTED", "CAUSAL_UNSUPPORTED"]

# Types whose causal-LM class cannot be given soft words at all.
CAUSAL_UNSUPPORTED: dict[str, str] = {}

# Types where soft words work but the hidden states entering the layers do not line up with the tokens.
CAUSAL_DEEP_UNSUPPORTED: dict[str, str] = {}
