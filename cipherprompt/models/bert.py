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
from collections.abc import Callable
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


# Steps
#
# Each block of the model (the embedding, every layer, the head) is an ordered list of named
# steps. A step runs under a named scope that is also its operator kind, such as ``linear`` or
# ``attention_normaliser``. The fused functions below (``embed``, ``encoder_layer``,
# ``classifier_head``) run a block's steps in order inside one function. The profiler compiles
# each step as its own SPU program, so the cost of every operator kind is measured on the same
# definition that training and private inference use.

# State key of the dropout keys of one block, by step name. It is absent when dropout is off.
DROPOUT_RNGS = "dropout_rngs"


@dataclass(frozen=True)
class Step:
    """One named step of a block: weights and state in, the state's new entries out.

    ``function(params, config, block_plan, inputs, rng)`` receives only the weights named in
    ``params``, only the state entries named in ``reads``, and its dropout key or None. It must
    return exactly the entries named in ``writes``. The declarations let a profiler compile the
    step on its own, and ``__call__`` enforces them so that they cannot drift from the code.
    """

    name: str
    # Named scope of the step and the operator kind its cost is attributed to.
    operator: str
    params: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    function: Callable[..., dict]
    # Whether the step applies dropout when the block is given dropout keys.
    dropout: bool = False

    def __call__(self, params: Params, config: BertConfig, block_plan, state: dict) -> dict:
        """Run the step under its named scope; return ``state`` updated with its writes."""
        weights = {key: params[key] for key in self.params}
        inputs = {key: state[key] for key in self.reads}
        rng = state.get(DROPOUT_RNGS, {}).get(self.name) if self.dropout else None
        with jax.named_scope(self.operator):
            written = self.function(weights, config, block_plan, inputs, rng)
        if set(written) != set(self.writes):
            raise RuntimeError(
                f"step {self.name!r} wrote {sorted(written)} but declares {list(self.writes)}; "
                "make its writes match what its function returns"
            )
        return {**state, **written}


def run_steps(steps: tuple[Step, ...], params: Params, config: BertConfig, block_plan,
              state: dict) -> dict:
    """Run ``steps`` in order on ``state``, the fused form of a block."""
    for step in steps:
        state = step(params, config, block_plan, state)
    return state


def _look_up_tokens(params, config, block_plan, inputs, rng):
    tokens = inputs["tokens"]
    if jnp.issubdtype(tokens.dtype, jnp.integer):
        words = jnp.take(params["word"], tokens, axis=0)
    else:
        words = tokens @ params["word"]
    seq_len = words.shape[-2]
    # Segment ids are all 0 for single-sentence classification.
    return {"x": words + params["position"][:seq_len] + params["token_type"][0]}


def _normalise_embeddings(params, config, plan, inputs, rng):
    norm = layer_normaliser(plan.embedding_normaliser)
    return {"x": norm(inputs["x"], **_norm_args(params["norm"], config))}


# The embedding block. Its block plan is the whole OperatorPlan.
EMBEDDING_STEPS = (
    Step("lookup", "embedding", ("word", "position", "token_type"), ("tokens",), ("x",),
         _look_up_tokens),
    Step("normalise", "layer_normaliser", ("norm",), ("x",), ("x",), _normalise_embeddings),
)


def _split_heads(t: jax.Array, config: BertConfig) -> jax.Array:
    batch, seq_len, _ = t.shape
    return t.reshape(batch, seq_len, config.num_heads, config.head_size).transpose(0, 2, 1, 3)


def _project_query_key_value(params, config, layer_plan, inputs, rng):
    x = inputs["x"]
    return {name: _split_heads(_dense(params[name], x), config)
            for name in ("query", "key", "value")}


def _score_keys(params, config, layer_plan, inputs, rng):
    scores = inputs["query"] @ inputs["key"].transpose(0, 1, 3, 2)
    return {"scores": scores * (1.0 / np.sqrt(config.head_size))}


def _normalise_scores(params, config, layer_plan, inputs, rng):
    normaliser = attention_normaliser(layer_plan.attention_normaliser)
    return {"weights": normaliser(inputs["scores"], inputs["mask"][:, None, None, :])}


def _weight_values(params, config, layer_plan, inputs, rng):
    batch, heads, seq_len, head_size = inputs["value"].shape
    context = _dropout(inputs["weights"], config.dropout, rng) @ inputs["value"]
    return {"context": context.transpose(0, 2, 1, 3).reshape(batch, seq_len, heads * head_size)}


def _project_context(params, config, layer_plan, inputs, rng):
    attended = _dense(params["attention_output"], inputs["context"])
    return {"attended": _dropout(attended, config.dropout, rng)}


def _normalise_attention_residual(params, config, layer_plan, inputs, rng):
    norm = layer_normaliser(layer_plan.layer_normaliser)
    x = inputs["x"] + inputs["attended"]
    return {"x": norm(x, **_norm_args(params["attention_norm"], config))}


def _expand(params, config, layer_plan, inputs, rng):
    return {"hidden": _dense(params["intermediate"], inputs["x"])}


def _activate(params, config, layer_plan, inputs, rng):
    return {"hidden": activation(layer_plan.activation)(inputs["hidden"])}


def _contract(params, config, layer_plan, inputs, rng):
    return {"out": _dropout(_dense(params["output"], inputs["hidden"]), config.dropout, rng)}


def _normalise_output_residual(params, config, layer_plan, inputs, rng):
    norm = layer_normaliser(layer_plan.layer_normaliser)
    x = inputs["x"] + inputs["out"]
    return {"x": norm(x, **_norm_args(params["output_norm"], config))}


# One post-norm transformer layer, whose block plan is the layer's LayerPlan. The layer reads
# and writes "x", and reads the key mask "mask" [batch, seq].
LAYER_STEPS = (
    # Self-attention: projections, scaled scores, the plan's normaliser, weighted values.
    Step("query_key_value", "linear", ("query", "key", "value"), ("x",),
         ("query", "key", "value"), _project_query_key_value),
    Step("scores", "attention_products", (), ("query", "key"), ("scores",), _score_keys),
    Step("weights", "attention_normaliser", (), ("scores", "mask"), ("weights",),
         _normalise_scores),
    Step("context", "attention_products", (), ("weights", "value"), ("context",),
         _weight_values, dropout=True),
    Step("attention_output", "linear", ("attention_output",), ("context",), ("attended",),
         _project_context, dropout=True),
    Step("attention_norm", "layer_normaliser", ("attention_norm",), ("x", "attended"), ("x",),
         _normalise_attention_residual),
    # Feed-forward block with the plan's activation.
    Step("intermediate", "linear", ("intermediate",), ("x",), ("hidden",), _expand),
    Step("activation", "activation", (), ("hidden",), ("hidden",), _activate),
    Step("output", "linear", ("output",), ("hidden",), ("out",), _contract, dropout=True),
    Step("output_norm", "layer_normaliser", ("output_norm",), ("x", "out"), ("x",),
         _normalise_output_residual),
)


def _pool_and_classify(params, config, block_plan, inputs, rng):
    pooled = jnp.einsum("bs,bsh->bh", inputs["pool"], inputs["x"])
    return {"logits": _dense(params, pooled)}


# The classifier head. Its weights are params["classifier"] itself.
HEAD_STEPS = (
    Step("classify", "head", ("kernel", "bias"), ("x", "pool"), ("logits",), _pool_and_classify),
)


@dataclass(frozen=True)
class Block:
    """A block of the classifier as the fused run and the profiler both see it."""

    # Named scope of the block: "embedding", "layer0".."layerN" or "head".
    scope: str
    # Path of the block's weights in the parameter tree.
    param_path: tuple[str | int, ...]
    # Operator choice passed to each step: the OperatorPlan or one of its LayerPlans.
    plan: object
    steps: tuple[Step, ...]


def classifier_blocks(config: BertConfig, plan: OperatorPlan) -> list[Block]:
    """List the blocks of the classifier in execution order."""
    check_encoder_plan(config, plan)
    layers = [Block(f"layer{index}", ("layers", index), layer_plan, LAYER_STEPS)
              for index, layer_plan in enumerate(plan.layers)]
    return [Block("embedding", ("embeddings",), plan, EMBEDDING_STEPS), *layers,
            Block("head", ("classifier",), None, HEAD_STEPS)]


def embed(params: Params, config: BertConfig, plan: OperatorPlan, tokens: jax.Array) -> jax.Array:
    """Map token ids [batch, seq] or one-hot rows [batch, seq, vocab] to normalised embeddings."""
    with jax.named_scope("embedding"):
        state = run_steps(EMBEDDING_STEPS, params["embeddings"], config, plan,
                          {"tokens": tokens})
    return state["x"]


def encoder_layer(
    params: Params,
    config: BertConfig,
    layer_plan,
    x: jax.Array,
    mask: jax.Array,
    rngs: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run one post-norm transformer layer; return (hidden states, attention weights).

    ``rngs`` holds one dropout key per dropout step of ``LAYER_STEPS``, in step order.
    """
    state = {"x": x, "mask": mask}
    if rngs is not None:
        names = [step.name for step in LAYER_STEPS if step.dropout]
        state[DROPOUT_RNGS] = dict(zip(names, rngs, strict=True))
    state = run_steps(LAYER_STEPS, params, config, layer_plan, state)
    return state["x"], state["weights"]


def _norm_args(params: Params, config: BertConfig) -> dict:
    return {"gamma": params["gamma"], "beta": params["beta"], "eps": config.layer_norm_eps}


def check_encoder_plan(config: BertConfig, plan: OperatorPlan) -> None:
    """Raise ValueError unless ``plan`` is an encoder plan with one entry per layer."""
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


def encode(
    params: Params,
    config: BertConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    mask: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Run embedding and all layers; return (last hidden states, per-layer hidden, attention)."""
    check_encoder_plan(config, plan)
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
    # The head's step needs neither the configuration nor a plan.
    with jax.named_scope("head"):
        state = run_steps(HEAD_STEPS, params["classifier"], None, None,
                          {"x": hidden, "pool": pool_weights})
    return state["logits"]


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
