"""BERT encoder with a sequence-classification head, in plain JAX.

This one definition serves fine-tuning, distillation, plaintext evaluation, the fixed-point
reference run and the two-party run. The non-linear operators of each layer come from an
``OperatorPlan``; every block runs inside a ``jax.named_scope`` so costs can be attributed.

Tokens enter either as integer ids (plaintext training: a gather) or as a one-hot float matrix
(private inference: a product of the client's one-hot matrix with the server's table, because a
gather at a secret index is far more expensive under MPC). Both give the same embeddings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cipherprompt.ops import activation, attention_normaliser, layer_normaliser
from cipherprompt.plan import OperatorPlan

Params = dict


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                      "intermediate_size", "max_positions", "num_labels"):
            if getattr(self, field) <= 0:
                raise ValueError(f"BertConfig.{field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BertConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown BertConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, path: Path, num_labels: int = 2) -> BertConfig:
        hf = json.loads(Path(path).read_text())
        if hf.get("model_type") != "bert" or hf.get("position_embedding_type", "absolute") != (
            "absolute"
        ):
            raise ValueError(f"{path} is not an absolute-position BERT config")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            layer_norm_eps=hf["layer_norm_eps"],
            num_labels=num_labels,
        )


def init_params(config: BertConfig, seed: int = 0, scale: float = 0.02) -> Params:
    """Random weights with BERT's initialiser scale, for tests and shape-only compilation."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(size):
        return {"gamma": np.ones(size, np.float32), "beta": np.zeros(size, np.float32)}

    def dense(fan_in, fan_out):
        return {"kernel": normal(fan_in, fan_out), "bias": np.zeros(fan_out, np.float32)}

    h, f = config.hidden_size, config.intermediate_size
    layers = [
        {
            "query": dense(h, h),
            "key": dense(h, h),
            "value": dense(h, h),
            "attention_output": dense(h, h),
            "attention_norm": norm(h),
            "intermediate": dense(h, f),
            "output": dense(f, h),
            "output_norm": norm(h),
        }
        for _ in range(config.num_layers)
    ]
    return {
        "embeddings": {
            "word": normal(config.vocab_size, h),
            "position": normal(config.max_positions, h),
            "token_type": normal(config.type_vocab_size, h),
            "norm": norm(h),
        },
        "layers": layers,
        "classifier": dense(h, config.num_labels),
    }


def _dense(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["kernel"] + params["bias"]


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def embed(params: Params, config: BertConfig, plan: OperatorPlan, tokens: jax.Array) -> jax.Array:
    """Map token ids [batch, seq] or one-hot rows [batch, seq, vocab] to normalised embeddings."""
    table = params["embeddings"]
    with jax.named_scope("embedding"):
        if jnp.issubdtype(tokens.dtype, jnp.integer):
            words = jnp.take(table["word"], tokens, axis=0)
        else:
            words = tokens @ table["word"]
        seq_len = words.shape[-2]
        # Segment ids are all 0 for single-sentence classification.
        x = words + table["position"][:seq_len] + table["token_type"][0]
    with jax.named_scope("embedding/layer_normaliser"):
        norm = layer_normaliser(plan.embedding_normaliser)
        return norm(x, table["norm"]["gamma"], table["norm"]["beta"], config.layer_norm_eps)


def encoder_layer(
    params: Params,
    config: BertConfig,
    layer_plan,
    x: jax.Array,
    mask: jax.Array,
    rngs: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run one post-norm transformer layer; return (hidden states, attention weights)."""
    batch, seq_len, _ = x.shape
    heads, head_size = config.num_heads, config.head_size
    norm = layer_normaliser(layer_plan.layer_normaliser)
    rate = config.dropout if rngs is not None else 0.0
    rngs = rngs if rngs is not None else (None, None, None)

    def split_heads(t):
        return t.reshape(batch, seq_len, heads, head_size).transpose(0, 2, 1, 3)

    # Self-attention: projections, scaled scores, the plan's normaliser, weighted values.
    with jax.named_scope("linear"):
        query = split_heads(_dense(params["query"], x))
        key = split_heads(_dense(params["key"], x))
        value = split_heads(_dense(params["value"], x))
    with jax.named_scope("attention_products"):
        scores = (query @ key.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(head_size))
    with jax.named_scope("attention_normaliser"):
        weights = attention_normaliser(layer_plan.attention_normaliser)(
            scores, mask[:, None, None, :]
        )
    with jax.named_scope("attention_products"):
        context = _dropout(weights, rate, rngs[0]) @ value
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq_len, heads * head_size)
    with jax.named_scope("linear"):
        attended = _dropout(_dense(params["attention_output"], context), rate, rngs[1])
    with jax.named_scope("layer_normaliser"):
        x = norm(x + attended, **_norm_args(params["attention_norm"], config))

    # Feed-forward block with the plan's activation.
    with jax.named_scope("linear"):
        hidden = _dense(params["intermediate"], x)
    with jax.named_scope("activation"):
        hidden = activation(layer_plan.activation)(hidden)
    with jax.named_scope("linear"):
        out = _dropout(_dense(params["output"], hidden), rate, rngs[2])
    with jax.named_scope("layer_normaliser"):
        x = norm(x + out, **_norm_args(params["output_norm"], config))
    return x, weights


def _norm_args(params: Params, config: BertConfig) -> dict:
    return {"gamma": params["gamma"], "beta": params["beta"], "eps": config.layer_norm_eps}


def encode(
    params: Params,
    config: BertConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    mask: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Run embedding and all layers; return (last hidden states, per-layer hidden, attention)."""
    if plan.embedding_normaliser is None or plan.final_normaliser is not None:
        raise ValueError(
            f"operator plan {plan.name!r} is a decoder plan; the BERT encoder needs an "
            "embedding normaliser and no final normaliser (presets: exact, reference, friendly)"
        )
    if plan.num_layers != config.num_layers:
        raise ValueError(
            f"operator plan {plan.name!r} has {plan.num_layers} layers, "
            f"the model has {config.num_layers}"
        )
    x = embed(params, config, plan, tokens)
    if dropout_rng is not None:
        dropout_rng, key = jax.random.split(dropout_rng)
        x = _dropout(x, config.dropout, key)
    hidden_states, attentions = [x], []
    for index, (layer_params, layer_plan) in enumerate(zip(params["layers"], plan.layers)):
        rngs = None
        if dropout_rng is not None:
            dropout_rng, *keys = jax.random.split(dropout_rng, 4)
            rngs = tuple(keys)
        with jax.named_scope(f"layer{index}"):
            x, weights = encoder_layer(layer_params, config, layer_plan, x, mask, rngs)
        hidden_states.append(x)
        attentions.append(weights)
    return x, hidden_states, attentions


def classify(
    params: Params,
    config: BertConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    mask: jax.Array,
    pool_weights: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Return class logits [batch, num_labels].

    ``pool_weights`` [batch, seq] is mask / number of real tokens: the mean pooling weights.
    The client computes them in the clear from its own mask, which keeps a secret division out
    of the private computation.
    """
    hidden, _, _ = encode(params, config, plan, tokens, mask, dropout_rng)
    return classifier_head(params, hidden, pool_weights)


def classifier_head(params: Params, hidden: jax.Array, pool_weights: jax.Array) -> jax.Array:
    """Mean-pool the hidden states [batch, seq, hidden] and project them to class logits."""
    with jax.named_scope("head"):
        pooled = jnp.einsum("bs,bsh->bh", pool_weights, hidden)
        return _dense(params["classifier"], pooled)


def pooling_weights(mask: np.ndarray) -> np.ndarray:
    """Mean-pooling weights from a [batch, seq] 0/1 mask."""
    mask = np.asarray(mask, np.float32)
    counts = mask.sum(axis=-1, keepdims=True)
    if np.any(counts == 0):
        raise ValueError("every row of the attention mask needs at least one real token")
    return mask / counts


def one_hot(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """One-hot float32 rows for integer token ids; the client's private embedding input."""
    ids = np.asarray(ids)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    rows = np.zeros(ids.shape + (vocab_size,), np.float32)
    np.put_along_axis(rows, ids[..., None], 1.0, axis=-1)
    return rows
