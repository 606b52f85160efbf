"""Llama-family decoder (SmolLM2 and models of the same layout) in plain JAX.

Like ``bert.py`` for the encoder, this one definition serves plaintext evaluation and generation
and is meant for the fixed-point and two-party runs. The non-linear operators of each layer come
from an ``OperatorPlan`` (preset ``decoder-exact``); every block runs inside a
``jax.named_scope`` so costs can be attributed.

A layer is pre-norm: RMSNorm, grouped-query self-attention with rotary position embedding,
residual; RMSNorm, SwiGLU feed-forward block, residual. After the last layer comes a final
RMSNorm and the output head, which is the transposed token embedding when the weights are tied.

Rotary embedding uses the rotate-half layout of Hugging Face Llama checkpoints: dimension i of a
head is rotated together with dimension i + head_size / 2. llama.cpp's GGUF files store the
query and key rows interleaved instead; ``llama_import`` reorders them on import.

Key/value cache: ``decode`` takes the keys and values of earlier positions and returns them with
the new positions appended, so a generation step runs only its new tokens through the model.
Positions are public: they are known when the program is traced, like the sequence length.

Fixed-capacity cache, for programs with static shapes: ``prefill`` runs a left-padded prompt and
returns a cache of ``capacity`` slots, and ``decode_step`` writes one token into the slot
``index`` and attends over all slots through a key mask. A token's slot is its rotary position.
Left padding shifts the real tokens' positions, but rotary attention scores depend only on the
distance between a query and a key, so the logits equal those of the unpadded prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from cipherprompt.ops import activation, attention_normaliser, layer_normaliser
from cipherprompt.plan import LayerPlan, OperatorPlan

Params = dict
# Keys and values of one layer, each [batch, kv_heads, positions, head_size].
LayerCache = tuple[jax.Array, jax.Array]
KVCache = tuple[LayerCache, ...]

# Llama's RMSNorm has no shift; a scalar zero fills the layer normalisers' beta argument.
_NO_SHIFT = 0.0


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder; the defaults are SmolLM2-135M's."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    # Key/value heads for grouped-query attention: each serves num_heads / num_kv_heads queries.
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    # Context length the model was trained for; positions beyond it are rejected.
    max_positions: int = 8192
    # Base of the rotary frequencies: dimension pair i turns at rope_theta^(-2i / head_size).
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    # True when the output head is the transposed token embedding table.
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "intermediate_size", "max_positions"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.head_size % 2:
            raise ValueError(
                f"head_size {self.head_size} (hidden_size / num_heads) must be even for rotary "
                "position embedding"
            )
        if not self.rope_theta > 1.0:
            raise ValueError(f"rope_theta must be greater than 1, got {self.rope_theta}")
        if not self.rms_norm_eps > 0.0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def param_shapes(config: LlamaConfig) -> Params:
    """Return the parameter tree with each array replaced by its shape.

    Dense kernels are [in, out], so a layer computes ``x @ kernel``. The query kernel's columns
    are head after head, each head in the rotate-half layout; the key kernel's likewise.
    """
    h, f, d = config.hidden_size, config.intermediate_size, config.head_size
    layer = {
        "attention_norm": {"gamma": (h,)},
        "query": {"kernel": (h, config.num_heads * d)},
        "key": {"kernel": (h, config.num_kv_heads * d)},
        "value": {"kernel": (h, config.num_kv_heads * d)},
        "attention_output": {"kernel": (config.num_heads * d, h)},
        "mlp_norm": {"gamma": (h,)},
        "gate": {"kernel": (h, f)},
        "up": {"kernel": (h, f)},
        "down": {"kernel": (f, h)},
    }
    shapes: Params = {
        "embeddings": {"word": (config.vocab_size, h)},
        "layers": [
            {name: dict(entry) for name, entry in layer.items()}
            for _ in range(config.num_layers)
        ],
        "final_norm": {"gamma": (h,)},
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (h, config.vocab_size)}
    return shapes


def init_params(config: LlamaConfig, seed: int = 0, scale: float = 0.02) -> Params:
    """Random weights (normal kernels, unit norm gains), for tests and shape-only compilation."""
    rng = np.random.default_rng(seed)

    def build(tree):
        if isinstance(tree, dict):
            return {key: build(value) for key, value in tree.items()}
        if isinstance(tree, list):
            return [build(value) for value in tree]
        return (rng.standard_normal(tree) * scale).astype(np.float32)

    params = build(param_shapes(config))
    for layer in params["layers"]:
        layer["attention_norm"]["gamma"] = np.ones(config.hidden_size, np.float32)
        layer["mlp_norm"]["gamma"] = np.ones(config.hidden_size, np.float32)
    params["final_norm"]["gamma"] = np.ones(config.hidden_size, np.float32)
    return params


def empty_cache(config: LlamaConfig, batch: int) -> KVCache:
    """Return a cache that contains no positions yet."""
    shape = (batch, config.num_kv_heads, 0, config.head_size)
    empty = jnp.zeros(shape, jnp.float32)
    return tuple((empty, empty) for _ in range(config.num_layers))


def pad_cache(cache: KVCache, capacity: int) -> KVCache:
    """Append zero slots to every layer's keys and values up to ``capacity`` positions."""
    padded = []
    for keys, values in cache:
        missing = capacity - keys.shape[2]
        if missing < 0:
            raise ValueError(f"the cache contains {keys.shape[2]} positions, more than the "
                             f"capacity {capacity}")
        widths = ((0, 0), (0, 0), (0, missing), (0, 0))
        padded.append((jnp.pad(keys, widths), jnp.pad(values, widths)))
    return tuple(padded)


def rotary_tables(positions: np.ndarray, head_size: int, theta: float) -> tuple[np.ndarray, ...]:
    """Return (cos, sin), each [*positions.shape, head_size] float32, for integer positions.

    Computed in float64 with NumPy, so the tables are constants of the traced program.
    """
    positions = np.asarray(positions)
    if not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    exponents = np.arange(0, head_size, 2, dtype=np.float64) / head_size
    inverse_frequencies = theta ** -exponents
    angles = positions[..., None].astype(np.float64) * inverse_frequencies
    # Rotate-half layout: the angle of pair i applies to dimensions i and i + head_size / 2.
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_at(index, capacity: int, head_size: int, theta: float) -> tuple[jax.Array, ...]:
    """Return (cos, sin), each [1, 1, 1, head_size], for the position ``index`` < ``capacity``.

    ``index`` may be traced: the tables of all ``capacity`` positions are constants of the
    program and ``index`` selects a row, so one program serves every position. Under SPU the
    index is a public value and the selection costs no interaction.
    """
    cos, sin = rotary_tables(np.arange(capacity), head_size, theta)

    def row(table):
        return jax.lax.dynamic_slice_in_dim(jnp.asarray(table), index, 1, axis=0)[None, None]

    return row(cos), row(sin)


def apply_rotary(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """Rotate each head of ``x`` [..., positions, head_size] by its position's angles."""
    half = x.shape[-1] // 2
    rotated_half = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated_half * sin


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """Map token ids [batch, seq] or one-hot rows [batch, seq, vocab] to embeddings."""
    table = params["embeddings"]["word"]
    with jax.named_scope("embedding"):
        if jnp.issubdtype(tokens.dtype, jnp.integer):
            return jnp.take(table, tokens, axis=0)
        return tokens @ table


def _attention(
    params: Params,
    config: LlamaConfig,
    layer_plan: LayerPlan,
    x: jax.Array,
    layer_cache: LayerCache,
    mask: jax.Array,
    rotary: tuple[np.ndarray, np.ndarray],
    write_index=None,
) -> tuple[jax.Array, LayerCache]:
    """Grouped-query self-attention over cached and new positions; return (output, new cache).

    With ``write_index`` None the new positions are appended to the cache. Otherwise the cache
    has a fixed capacity and the new positions overwrite its slots from ``write_index`` on.
    """
    batch, seq_len, _ = x.shape
    heads, kv_heads, head_size = config.num_heads, config.num_kv_heads, config.head_size

    def split_heads(t, count):
        return t.reshape(batch, seq_len, count, head_size).transpose(0, 2, 1, 3)

    with jax.named_scope("linear"):
        query = split_heads(x @ params["query"]["kernel"], heads)
        key = split_heads(x @ params["key"]["kernel"], kv_heads)
        value = split_heads(x @ params["value"]["kernel"], kv_heads)
    with jax.named_scope("rotary"):
        query = apply_rotary(query, *rotary)
        key = apply_rotary(key, *rotary)
    # An empty cache is skipped rather than concatenated, so no traced program has a zero-size
    # array in it.
    if write_index is not None:
        keys = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], key, write_index, axis=2)
        values = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], value, write_index, axis=2)
    elif layer_cache[0].shape[2] == 0:
        keys, values = key, value
    else:
        keys = jnp.concatenate([layer_cache[0], key], axis=2)
        values = jnp.concatenate([layer_cache[1], value], axis=2)

    # Query head q uses key/value head q // group_size, as in Hugging Face's repeat_kv, so the
    # heads are grouped as [kv_heads, group_size] without copying the keys.
    grouped = query.reshape(batch, kv_heads, config.group_size, seq_len, head_size)
    with jax.named_scope("attention_products"):
        scores = jnp.einsum("bkgqd,bktd->bkgqt", grouped, keys) * (1.0 / np.sqrt(head_size))
    with jax.named_scope("attention_normaliser"):
        weights = attention_normaliser(layer_plan.attention_normaliser)(scores, mask)
    with jax.named_scope("attention_products"):
        context = jnp.einsum("bkgqt,bktd->bkgqd", weights, values)
        context = context.reshape(batch, heads, seq_len, head_size)
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq_len, heads * head_size)
    with jax.named_scope("linear"):
        output = context @ params["attention_output"]["kernel"]
    return output, (keys, values)


def _feed_forward(params: Params, layer_plan: LayerPlan, x: jax.Array) -> jax.Array:
    """SwiGLU block: down(activation(gate(x)) * up(x))."""
    with jax.named_scope("linear"):
        gate = x @ params["gate"]["kernel"]
        up = x @ params["up"]["kernel"]
    with jax.named_scope("activation"):
        gate = activation(layer_plan.activation)(gate)
    with jax.named_scope("gated_product"):
        hidden = gate * up
    with jax.named_scope("linear"):
        return hidden @ params["down"]["kernel"]


def decoder_layer(
    params: Params,
    config: LlamaConfig,
    layer_plan: LayerPlan,
    x: jax.Array,
    layer_cache: LayerCache,
    mask: jax.Array,
    rotary: tuple[np.ndarray, np.ndarray],
    write_index=None,
) -> tuple[jax.Array, LayerCache]:
    """Run one pre-norm decoder layer; return (hidden states, the layer's extended cache).

    ``write_index`` selects the fixed-capacity cache, as in ``_attention``.
    """
    norm = layer_normaliser(layer_plan.layer_normaliser)
    eps = config.rms_norm_eps

    with jax.named_scope("layer_normaliser"):
        normed = norm(x, params["attention_norm"]["gamma"], _NO_SHIFT, eps)
    attended, layer_cache = _attention(params, config, layer_plan, normed, layer_cache, mask,
                                       rotary, write_index)
    x = x + attended

    with jax.named_scope("layer_normaliser"):
        normed = norm(x, params["mlp_norm"]["gamma"], _NO_SHIFT, eps)
    x = x + _feed_forward(params, layer_plan, normed)
    return x, layer_cache


def _check_plan(plan: OperatorPlan, config: LlamaConfig) -> None:
    if not plan.is_decoder:
        raise ValueError(
            f"operator plan {plan.name!r} is not a decoder plan: a decoder needs no embedding "
            "normaliser and a final normaliser; use the preset decoder-exact"
        )
    if plan.num_layers != config.num_layers:
        raise ValueError(
            f"operator plan {plan.name!r} has {plan.num_layers} layers, "
            f"the model has {config.num_layers}"
        )


def _check_cache(cache: KVCache, config: LlamaConfig, batch: int) -> int:
    """Validate the cache's structure and shapes; return the number of cached positions."""
    if len(cache) != config.num_layers:
        raise ValueError(
            f"the key/value cache has {len(cache)} layers, the model has {config.num_layers}"
        )
    first_keys = cache[0][0]
    expected = (batch, config.num_kv_heads, first_keys.shape[2], config.head_size)
    for index, (keys, values) in enumerate(cache):
        if keys.shape != expected or values.shape != expected:
            raise ValueError(
                f"key/value cache of layer {index} has shapes {keys.shape} and {values.shape}, "
                f"expected {expected} [batch, kv_heads, positions, head_size]"
            )
    return first_keys.shape[2]


def _positions(
    positions: np.ndarray | None, prefix_len: int, batch: int, seq_len: int, config: LlamaConfig
) -> np.ndarray:
    """Return the new tokens' positions as [batch or 1, seq_len] ints, checked against limits."""
    if positions is None:
        positions = np.arange(prefix_len, prefix_len + seq_len)[None, :]
    else:
        if isinstance(positions, jax.core.Tracer):
            raise TypeError("positions must be known when tracing: pass a NumPy array")
        positions = np.asarray(positions)
        if positions.ndim == 1:
            positions = positions[None, :]
        valid_rows = positions.ndim == 2 and positions.shape[0] in (1, batch)
        if not valid_rows or positions.shape[-1] != seq_len:
            raise ValueError(
                f"positions has shape {positions.shape}, expected [{seq_len}] or "
                f"[{batch}, {seq_len}] for {seq_len} new tokens"
            )
    if positions.min() < 0 or positions.max() >= config.max_positions:
        raise ValueError(
            f"positions must lie in [0, {config.max_positions}), got "
            f"{positions.min()}..{positions.max()}"
        )
    return positions


def attention_mask(
    prefix_len: int, seq_len: int, key_mask: jax.Array | None = None
) -> jax.Array:
    """Return the causal mask of new tokens over all keys, shaped to broadcast against scores.

    New token i sits at cache index prefix_len + i and attends to the keys up to that index.
    ``key_mask`` [batch, prefix_len + seq_len] (1.0 real, 0.0 padding) also hides padded keys,
    except that every new token attends to its own key. So the row of a padded token is never
    empty, which would make the attention normaliser divide by zero. The result is
    [seq_len, keys], or [batch, 1, 1, seq_len, keys] with a key mask.
    """
    keys = prefix_len + seq_len
    causal = np.arange(keys)[None, :] <= prefix_len + np.arange(seq_len)[:, None]
    causal = causal.astype(np.float32)
    if key_mask is None:
        return jnp.asarray(causal)
    if key_mask.ndim != 2 or key_mask.shape[1] != keys:
        raise ValueError(
            f"key_mask has shape {key_mask.shape}, expected [batch, {keys}]: one entry per "
            f"cached and new position"
        )
    own_key = np.arange(keys)[None, :] == prefix_len + np.arange(seq_len)[:, None]
    # A select on a public condition: under SPU it costs no interaction.
    visible = jnp.where(own_key[None, :, :], 1.0, key_mask[:, None, :])
    return (causal[None, :, :] * visible)[:, None, None, :, :]


def decode(
    params: Params,
    config: LlamaConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    cache: KVCache | None = None,
    key_mask: jax.Array | None = None,
    positions: np.ndarray | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run new tokens through every layer and the final norm; return (hidden, extended cache).

    ``tokens`` are ids [batch, seq] or one-hot rows [batch, seq, vocab]; ``cache`` contains the
    keys and values of earlier positions (None for none). ``positions`` [seq] or [batch, seq]
    are the rotary positions of the new tokens and default to the cache length onwards. Pass
    them with ``key_mask`` when padded positions sit in the cache. The hidden states are
    [batch, seq, hidden_size], and the returned cache also contains the new positions.
    """
    _check_plan(plan, config)
    tokens = jnp.asarray(tokens)
    if tokens.ndim not in (2, 3):
        raise ValueError(
            f"tokens has shape {tokens.shape}, expected ids [batch, seq] or one-hot rows "
            "[batch, seq, vocab]"
        )
    if tokens.ndim == 3 and tokens.shape[-1] != config.vocab_size:
        raise ValueError(f"one-hot tokens have {tokens.shape[-1]} columns, expected "
                         f"vocab_size {config.vocab_size}")
    batch, seq_len = tokens.shape[:2]
    if seq_len == 0:
        raise ValueError(f"tokens has shape {tokens.shape}: pass at least one new token")
    if cache is None:
        cache = empty_cache(config, batch)
    prefix_len = _check_cache(cache, config, batch)
    new_positions = _positions(positions, prefix_len, batch, seq_len, config)
    cos, sin = rotary_tables(new_positions, config.head_size, config.rope_theta)
    # [batch or 1, 1, seq, head_size]: the same angles for every head.
    rotary = (cos[:, None], sin[:, None])
    mask = attention_mask(prefix_len, seq_len, key_mask)

    x = embed(params, tokens)
    new_cache = []
    for index, (layer_params, layer_plan) in enumerate(zip(params["layers"], plan.layers)):
        with jax.named_scope(f"layer{index}"):
            x, layer_cache = decoder_layer(layer_params, config, layer_plan, x, cache[index],
                                           mask, rotary)
        new_cache.append(layer_cache)

    return final_norm(params, config, plan, x), tuple(new_cache)


def final_norm(params: Params, config: LlamaConfig, plan: OperatorPlan, x: jax.Array) -> jax.Array:
    """Apply the plan's final normaliser to hidden states [..., hidden_size]."""
    with jax.named_scope("final/layer_normaliser"):
        norm = layer_normaliser(plan.final_normaliser)
        return norm(x, params["final_norm"]["gamma"], _NO_SHIFT, config.rms_norm_eps)


def prefill(
    params: Params,
    config: LlamaConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    key_mask: jax.Array,
    capacity: int,
) -> tuple[jax.Array, KVCache]:
    """Run a left-padded prompt; return (last position's logits [batch, vocab], cache).

    ``tokens`` [batch, length] ids or [batch, length, vocab] one-hot rows sit at positions
    0..length-1, with the padding first; ``key_mask`` [batch, length] is 0.0 on padding. The
    cache has ``capacity`` slots, the prompt in the first ``length`` ones and zeros after.
    """
    length = tokens.shape[1]
    if not length <= capacity <= config.max_positions:
        raise ValueError(f"capacity must lie in [{length}, {config.max_positions}] for a "
                         f"{length}-token prompt, got {capacity}")
    hidden, cache = decode(params, config, plan, tokens, key_mask=key_mask)
    return lm_head(params, config, hidden[:, -1]), pad_cache(cache, capacity)


def prompt_context(config: LlamaConfig, key_mask: jax.Array) -> tuple[jax.Array, tuple]:
    """Return (attention mask, rotary tables) of a prompt at positions 0..length-1.

    ``key_mask`` [batch, length] is 0.0 on padding, as in ``attention_mask``.
    """
    length = key_mask.shape[1]
    cos, sin = rotary_tables(np.arange(length)[None, :], config.head_size, config.rope_theta)
    return attention_mask(0, length, key_mask), (cos[:, None], sin[:, None])


def step_context(config: LlamaConfig, key_mask: jax.Array, index) -> tuple[jax.Array, tuple]:
    """Return (attention mask, rotary tables) of one token at the cache slot ``index``.

    ``key_mask`` [batch, capacity] marks the slots the token attends to; it always attends to
    its own slot, as in ``attention_mask``. ``index`` may be traced.
    """
    capacity = key_mask.shape[1]
    rotary = rotary_at(index, capacity, config.head_size, config.rope_theta)
    own_slot = jnp.arange(capacity)[None, :] == index
    mask = jnp.where(own_slot, 1.0, key_mask)[:, None, None, None, :]
    return mask, rotary


def decode_step(
    params: Params,
    config: LlamaConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    cache: KVCache,
    key_mask: jax.Array,
    index,
) -> tuple[jax.Array, KVCache]:
    """Run one token through a fixed-capacity cache; return (logits [batch, vocab], cache).

    ``tokens`` [batch, 1] ids or [batch, 1, vocab] one-hot rows; the token takes slot and
    rotary position ``index``, which may be traced. ``key_mask`` [batch, capacity] marks the
    slots it attends to: the real prompt tokens, the earlier steps and ``index`` itself.
    """
    _check_plan(plan, config)
    capacity = _check_cache(cache, config, tokens.shape[0])
    if tokens.shape[1] != 1:
        raise ValueError(f"tokens has shape {tokens.shape}, expected one token per row")
    if key_mask.shape != (tokens.shape[0], capacity):
        raise ValueError(f"key_mask has shape {key_mask.shape}, expected "
                         f"[{tokens.shape[0]}, {capacity}]: one entry per cache slot")
    mask, rotary = step_context(config, key_mask, index)

    x = embed(params, jnp.asarray(tokens))
    new_cache = []
    for layer, (layer_params, layer_plan) in enumerate(zip(params["layers"], plan.layers)):
        with jax.named_scope(f"layer{layer}"):
            x, layer_cache = decoder_layer(layer_params, config, layer_plan, x, cache[layer],
                                           mask, rotary, write_index=index)
        new_cache.append(layer_cache)
    hidden = final_norm(params, config, plan, x[:, -1])
    return lm_head(params, config, hidden), tuple(new_cache)


def lm_head(params: Params, config: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """Project final hidden states [..., hidden_size] to vocabulary logits [..., vocab_size]."""
    with jax.named_scope("head"):
        if config.tie_word_embeddings:
            return hidden @ params["embeddings"]["word"].T
        return hidden @ params["lm_head"]["kernel"]


def forward(
    params: Params,
    config: LlamaConfig,
    plan: OperatorPlan,
    tokens: jax.Array,
    cache: KVCache | None = None,
    key_mask: jax.Array | None = None,
    positions: np.ndarray | None = None,
) -> tuple[jax.Array, KVCache]:
    """Return (logits [batch, seq, vocab_size] of the new tokens, extended cache).

    Same arguments as ``decode``. A generation step needs only the last position's logits:
    call ``decode`` and apply ``lm_head`` to that row to skip the other rows' head products.
    """
    hidden, cache = decode(params, config, plan, tokens, cache, key_mask, positions)
    return lm_head(params, config, hidden), cache


def generate_greedy(
    params: Params,
    config: LlamaConfig,
    plan: OperatorPlan,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Greedily continue one prompt in plaintext, one token per step with the cache.

    Returns the new token ids, ending early after the first id in ``stop_ids`` (included).
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; greedy generation needs at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > config.max_positions:
        raise ValueError(
            f"{len(prompt_ids)} prompt tokens plus {max_new_tokens} new ones exceed the "
            f"model's {config.max_positions} positions"
        )
    stop = set(stop_ids)
    # Device arrays once, rather than a copy of every NumPy weight in every step.
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokens = jnp.asarray([list(prompt_ids)], jnp.int32)
    cache = None
    generated: list[int] = []
    for _ in range(max_new_tokens):
        hidden, cache = decode(params, config, plan, tokens, cache)
        next_id = int(jnp.argmax(lm_head(params, config, hidden[0, -1])))
        generated.append(next_id)
        if next_id in stop:
            break
        tokens = jnp.asarray([[next_id]], jnp.int32)
    return generated
