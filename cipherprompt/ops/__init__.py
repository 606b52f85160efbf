"""Non-linear operators, one interface per kind, chosen per layer by an operator plan."""

from cipherprompt.ops.activation import ACTIVATIONS, Activation, activation
from cipherprompt.ops.attention import (
    ATTENTION_NORMALISERS,
    AttentionNormaliser,
    attention_normaliser,
)
from cipherprompt.ops.norm import LAYER_NORMALISERS, LayerNormaliser, layer_normaliser

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_NORMALISERS",
    "LAYER_NORMALISERS",
    "Activation",
    "AttentionNormaliser",
    "LayerNormaliser",
    "activation",
    "attention_normaliser",
    "layer_normaliser",
]
