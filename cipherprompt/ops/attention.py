"""Attention normalisers: turn a row of attention scores into weights that sum to 1.

Every normaliser takes ``scores`` of shape [..., queries, keys] and a key ``mask`` that
broadcasts against it (1.0 for a real token, 0.0 for padding). Padded keys get weight exactly
0, so padding never changes the answer. The mask is multiplied in rather than added as a large
negative bias: SPU's fixed-point exp is inaccurate far below zero, and a product is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cipherprompt.ops.base import Operator, lookup, make_registry

# Subtracted from padded scores before the row maximum so that padding cannot set the shift.
_PAD_SHIFT = 32.0


class AttentionNormaliser(Operator):
    kind = "attention_normaliser"

    def __call__(self, scores: jax.Array, mask: jax.Array) -> jax.Array:
        raise NotImplementedError


def _normalise_rows(weights: jax.Array) -> jax.Array:
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


class Softmax(AttentionNormaliser):
    name = "softmax"
    formula = "exp(s - max s) * m / sum(exp(s - max s) * m)"
    primitives = "row maximum (comparison tree), exp, one reciprocal per row"

    def __call__(self, scores, mask):
        shifted = scores - jnp.max(scores - (1.0 - mask) * _PAD_SHIFT, axis=-1, keepdims=True)
        return _normalise_rows(jnp.exp(shifted) * mask)


class TwoQuad(AttentionNormaliser):
    """MPCFormer's 2Quad: a shifted square in place of exp, no maximum needed."""

    name = "2quad"
    shift = 5.0
    formula = "(s + 5)^2 * m / sum((s + 5)^2 * m)"
    # Not an approximation of softmax on any range: only usable after distillation.
    fitted_range = None
    max_error = 1.0
    primitives = "one element-wise square, one reciprocal per row"

    def __call__(self, scores, mask):
        return _normalise_rows(jnp.square(scores + self.shift) * mask)


class ReluNormalised(AttentionNormaliser):
    name = "relu_norm"
    epsilon = 1e-3
    formula = "relu(s) * m / (sum(relu(s) * m) + 1e-3)"
    fitted_range = None
    max_error = 1.0
    primitives = "one comparison per element, one reciprocal per row"

    def __call__(self, scores, mask):
        weights = jax.nn.relu(scores) * mask
        return weights / (jnp.sum(weights, axis=-1, keepdims=True) + self.epsilon)


class PowerSoftmax(AttentionNormaliser):
    """Softmax with exp(x) replaced by (1 + x/n)^n for x = s - max s, clipped at x = -n."""

    name = "power_softmax"
    degree = 8
    formula = "relu(1 + (s - max s)/8)^8 * m / sum(...)"
    fitted_range = (-8.0, 0.0)
    # Largest weight difference against softmax on rows of scores drawn from fitted_range.
    max_error = 0.06
    primitives = "row maximum, one comparison and three squarings per element, one reciprocal"

    def __call__(self, scores, mask):
        shifted = scores - jnp.max(scores - (1.0 - mask) * _PAD_SHIFT, axis=-1, keepdims=True)
        base = jax.nn.relu(1.0 + shifted / self.degree)
        for _ in range(3):
            base = base * base
        return _normalise_rows(base * mask)


ATTENTION_NORMALISERS = make_registry(
    AttentionNormaliser, Softmax, TwoQuad, ReluNormalised, PowerSoftmax
)


def attention_normaliser(name: str) -> AttentionNormaliser:
    return lookup(ATTENTION_NORMALISERS, AttentionNormaliser.kind, name)  # type: ignore[return-value]
