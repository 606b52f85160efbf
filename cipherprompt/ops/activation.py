"""Activation operators for the feed-forward block."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from cipherprompt.ops.base import Operator, lookup, make_registry


class Activation(Operator):
    kind = "activation"
    # Name of the exact activation that fitted_range and max_error refer to.
    reference: ClassVar[str] = "gelu_erf"

    def __call__(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


class GeluErf(Activation):
    name = "gelu_erf"
    formula = "x * (1 + erf(x / sqrt(2))) / 2"
    # XLA lowers erf into a rational approximation with divisions before SPU sees it: measured
    # 600 MB of traffic and 40 s for a 32x1536 tensor under CHEETAH (2 cores, loopback).
    primitives = "rational erf approximation: divisions, exp, comparisons"

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class GeluTanh(Activation):
    name = "gelu_tanh"
    formula = "x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) / 2"
    fitted_range = (-8.0, 8.0)
    # Against gelu_erf in float32 on fitted_range; this is the form the original BERT code used.
    max_error = 4.8e-4
    primitives = "tanh via SPU's sigmoid and exp approximations"

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=True)


class Relu(Activation):
    name = "relu"
    formula = "max(x, 0)"
    fitted_range = (-8.0, 8.0)
    # GELU(x) - ReLU(x) peaks at x = -0.75, where GELU(x) = -0.17.
    max_error = 0.17
    primitives = "one comparison (msb) and one multiplexer per element"

    def __call__(self, x):
        return jax.nn.relu(x)


class QuadGelu(Activation):
    """Degree-2 least-squares fit of GELU; MPCFormer uses the same idea as "Quad"."""

    name = "quad"
    # Coefficients from a least-squares fit of gelu_erf on a uniform grid over fitted_range.
    a, b, c = 0.1277, 0.5, 0.2564
    formula = "0.1277 x^2 + 0.5 x + 0.2564"
    fitted_range = (-4.0, 4.0)
    max_error = 0.30
    primitives = "one element-wise product and one truncation per element"

    def __call__(self, x):
        return self.a * x * x + self.b * x + self.c


class Silu(Activation):
    """SiLU (also called swish), the gate activation of Llama's SwiGLU feed-forward block."""

    name = "silu"
    reference = "silu"
    formula = "x * sigmoid(x) = x / (1 + exp(-x))"
    # SPU 0.9.5 compiles jax.nn.silu into exp and a reciprocal, not into its sigmoid_mode
    # approximation: under REF2K (FM64, 18 fraction bits) it was within 2.4e-3 of the exact SiLU
    # on [-12, 12]. The same formula written with tanh was worse there (1.6e-2).
    primitives = "exp and one reciprocal per element, one element-wise product"

    def __call__(self, x):
        return jax.nn.silu(x)


class PiecewiseSilu(Activation):
    """SiLU as ReLU minus a degree-5 polynomial correction near zero: no exp, no reciprocal.

    silu(x) - relu(x) = -h(|x|) with h(t) = t * sigmoid(-t) for every x, and h falls from its
    peak 0.278 at t = 1.28 to h(7) = 0.0064. The correction is a least-squares fit of h on
    |x| < 7 in the variable u = |x| / 7, so the coefficients stay of order 1 to 30 and keep
    their precision in fixed point. For |x| >= 7 the result is relu(x), whose error h(|x|) is
    below h(7), so max_error holds for every input, not only on fitted_range.
    """

    name = "silu_piecewise"
    reference = "silu"
    # Polynomial in u = |x| / threshold, coefficients of u^1 .. u^5.
    threshold = 7.0
    coefficients = (3.7249, -16.7125, 29.1849, -23.2003, 7.0128)
    formula = ("(x + |x|) / 2 - [|x| < 7] * p(|x| / 7), p(u) = 3.7249 u - 16.7125 u^2 "
               "+ 29.1849 u^3 - 23.2003 u^4 + 7.0128 u^5")
    # Measured against the exact SiLU in float32 on a grid of 800,001 points over this range.
    fitted_range = (-32.0, 32.0)
    max_error = 6.4e-3
    primitives = ("two comparisons (the absolute value and the test against 7) with their "
                  "multiplexers, five element-wise products for the polynomial")

    def __call__(self, x):
        magnitude = jnp.abs(x)
        u = magnitude * (1.0 / self.threshold)
        # Horner's scheme from the highest coefficient; the polynomial has no constant term.
        correction = jnp.zeros_like(u)
        for coefficient in reversed(self.coefficients):
            correction = (correction + coefficient) * u
        correction = jnp.where(magnitude < self.threshold, correction, 0.0)
        return (x + magnitude) * 0.5 - correction


class HardSwish(Activation):
    """MobileNetV3's hard swish: SiLU with the sigmoid replaced by a clipped line."""

    name = "hard_swish"
    reference = "silu"
    formula = "x * clip((x + 3) / 6, 0, 1)"
    # Measured against the exact SiLU in float32; the largest error is at x = -3.
    fitted_range = (-32.0, 32.0)
    max_error = 0.143
    primitives = "two comparisons (the clip) and one element-wise product"

    def __call__(self, x):
        return x * jnp.clip((x + 3.0) * (1.0 / 6.0), 0.0, 1.0)


ACTIVATIONS = make_registry(
    Activation, GeluErf, GeluTanh, Relu, QuadGelu, Silu, PiecewiseSilu, HardSwish
)


def activation(name: str) -> Activation:
    return lookup(ACTIVATIONS, Activation.kind, name)  # type: ignore[return-value]

