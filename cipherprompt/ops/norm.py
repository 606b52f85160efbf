"""Layer normalisers over the last (hidden) axis."""

from __future__ import annotations

import math

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


class L1LayerNorm(LayerNormaliser):
    """LayerNorm with the standard deviation estimated from the mean absolute deviation.

    For normally distributed rows, mean |x - mean| = sqrt(2 / pi) * std, so scaling the mean
    absolute deviation by sqrt(pi / 2) estimates the standard deviation without a square root.
    The secure cost is one absolute value per element (a comparison) and one reciprocal per
    row, in place of LayerNorm's square per element and reciprocal square root per row.
    ``max_error`` was measured against LayerNorm on 20,000 normal rows of width 384 with random
    offsets and scales in [0.1, 10] (mean error 0.0086). Rows with outliers, such as the hidden
    states of a fine-tuned BERT, differ more, so the operator needs distillation.
    """

    name = "l1_layernorm"
    formula = "(x - mean) / (sqrt(pi / 2) * mean(|x - mean|) + eps) * gamma + beta"
    # Output error bound for normal rows of width 384; not an input interval, so no range.
    fitted_range = None
    max_error = 0.24
    primitives = "one absolute value (a comparison) per element, one reciprocal per row"
    # Standard deviation over mean absolute deviation for a normal distribution.
    gaussian_factor = math.sqrt(math.pi / 2)

    def __call__(self, x, gamma, beta, eps):
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        spread = self.gaussian_factor * jnp.mean(jnp.abs(centred), axis=-1, keepdims=True)
        return centred / (spread + eps) * gamma + beta


class RmsNorm(LayerNormaliser):
    """Root-mean-square normalisation, the normaliser of Llama-family decoders.

    Llama's RMSNorm has no shift: the decoder passes beta = 0.0. Beta stays in the signature so
    that every layer normaliser fits every normaliser slot.
    """

    name = "rmsnorm"
    formula = "x / sqrt(mean(x^2) + eps) * gamma + beta"
    primitives = "one element-wise square, one reciprocal square root per row"
    # The row is scaled by this power of two before squaring, which is exact in float. In SPU's
    # fixed point (FM64, 18 fraction bits) a product must stay below 2^27, so x^2 overflows
    # for |x| > 11,585. SmolLM2-135M's residual stream reaches 24,000 in one dimension of
    # some tokens from layer 12 on. Scaled by 1/4, the square stays below 2^27 up to
    # |x| = 46,000. The smallest rows, the embeddings (rms near 0.1), then lose about 0.1% of
    # their mean square to truncation (an estimate from the truncation step, 2^-18). eps is
    # scaled by 1/16 too, so in fixed point Llama's 1e-5 rounds to 0: no real row's mean square
    # comes near it.
    input_scale = 0.25

    def __call__(self, x, gamma, beta, eps):
        scaled = x * self.input_scale
        mean_square = jnp.mean(scaled * scaled, axis=-1, keepdims=True)
        scaled_eps = eps * self.input_scale**2
        return scaled * jax.lax.rsqrt(mean_square + scaled_eps) * gamma + beta


class L1RmsNorm(LayerNormaliser):
    """RMSNorm with the root mean square estimated from the mean absolute value.

    For normally distributed rows with zero mean, mean |x| = sqrt(2 / pi) * rms, so
    sqrt(pi / 2) * mean(|x|) estimates the root mean square without a square root. The secure
    cost is one absolute value per element (a comparison) and one reciprocal per row, in place
    of RMSNorm's square per element and reciprocal square root per row. The hidden states of a
    trained decoder are far from normal: in SmolLM2-135M the ratio rms / mean |x| ranged from
    1.3 to 10 within one layer (median about 1.9), so the operator needs distillation.
    ``max_error`` was measured against RMSNorm on normal rows of width 576 with scales in
    [0.1, 10].
    """

    name = "l1_rmsnorm"
    formula = "x / (sqrt(pi / 2) * mean(|x|) + eps) * gamma + beta"
    # Output error bound for normal rows of width 576; not an input interval, so no range.
    fitted_range = None
    max_error = 0.2
    primitives = "one absolute value (a comparison) per element, one reciprocal per row"
    gaussian_factor = math.sqrt(math.pi / 2)

    def __call__(self, x, gamma, beta, eps):
        spread = self.gaussian_factor * jnp.mean(jnp.abs(x), axis=-1, keepdims=True)
        return x / (spread + eps) * gamma + beta


LAYER_NORMALISERS = make_registry(
    LayerNormaliser, LayerNorm, MeanCentre, L1LayerNorm, RmsNorm, L1RmsNorm
)


def layer_normaliser(name: str) -> LayerNormaliser:
    return lookup(LAYER_NORMALISERS, LayerNormaliser.kind, name)  # type: ignore[return-value]
