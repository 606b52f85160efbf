"""Layer normalisers over the last (hidden) axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cipherprompt.ops.base import Operator, lookup, make_registry


class LayerNormaliser(Operator):
    kind = "layer_normaliser"

    def __call__(self, x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float) -> jax.Array:
        raise NotImplementedError


class LayerNorm(LayerNormaliser):
    name = "layernorm"
    formula = "(x - mean) / sqrt(var + eps) * gamma + beta"
    primitives = "one element-wise square, one reciprocal square root per row"

    def __call__(self, x, gamma, beta, eps):
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        return centred * jax.lax.rsqrt(variance + eps) * gamma + beta


class MeanCentre(LayerNormaliser):
    """LayerNorm without the variance: only usable after distillation rescales gamma."""

    name = "mean_centre"
    formula = "(x - mean) * gamma + beta"
    fitted_range = None
    max_error = float("inf")
    # The mean and the centring are local, but the products with 1/hidden and with the
    # server-owned gamma each need a truncation, which costs OT traffic.
    primitives = "products with constants and the server-owned gamma; no square or rsqrt"

    def __call__(self, x, gamma, beta, eps):
        return (x - jnp.mean(x, axis=-1, keepdims=True)) * gamma + beta


class RmsNorm(LayerNormaliser):
    """Root-mean-square normalisation, the normaliser of Llama-family decoders.

    Llama's RMSNorm has no shift: the decoder passes beta = 0.0. Beta stays in the signature so
    that every layer normaliser fits every normaliser slot.
    """

    name = "rmsnorm"
    formula = "x / sqrt(mean(x^2) + eps) * gamma + beta"
    primitives = "one element-wise square, one reciprocal square root per row"

    def __call__(self, x, gamma, beta, eps):
        mean_square = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(mean_square + eps) * gamma + beta


LAYER_NORMALISERS = make_registry(LayerNormaliser, LayerNorm, MeanCentre, RmsNorm)


def layer_normaliser(name: str) -> LayerNormaliser:
    return lookup(LAYER_NORMALISERS, LayerNormaliser.kind, name)  # type: ignore[return-value]
