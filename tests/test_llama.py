"""Llama decoder on a tiny random model: key/value cache, causality, grouped heads, padding."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherprompt.models.bert import BertConfig, encode
from cipherprompt.models.bert import init_params as init_bert_params
from cipherprompt.models.llama import (
    LlamaConfig,
    apply_rotary,
    decode,
    decode_step,
    forward,
    generate_greedy,
    init_params,
    lm_head,
    param_shapes,
    prefill,
    rotary_tables,
)
from cipherprompt.plan import DECODER_EXACT_LAYER, LayerPlan, OperatorPlan

# Distinct sizes, so a transposed axis cannot pass: 6 query heads of size 6 in 2 groups of 3.
CONFIG = LlamaConfig(
    vocab_size=53,
    hidden_size=36,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=44,
    max_positions=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
PLAN = OperatorPlan.preset("decoder-exact", CONFIG.num_layers)
SEQ_LEN = 7
# Random weights at scale 0.3 give logits of order 1, so differences show at 1e-5.
SCALE = 0.3
ATOL = 2e-5


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=1, scale=SCALE)


def random_ids(seed: int, batch: int = 2, length: int = SEQ_LEN) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)


def copy_tree(tree):
    if isinstance(tree, dict):
        return {key: copy_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [copy_tree(value) for value in tree]
    return np.array(tree)


def logits_of(params, ids, config=CONFIG, **kwargs) -> np.ndarray:
    plan = OperatorPlan.preset("decoder-exact", config.num_layers)
    logits, _ = forward(params, config, plan, jnp.asarray(ids), **kwargs)
    return np.asarray(logits)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 35, "not divisible by num_heads"),
        ("num_kv_heads", 4, "not divisible by num_kv_heads"),
        ("num_layers", 0, "num_layers must be a positive int"),
        ("rope_theta", 1.0, "rope_theta must be greater than 1"),
        ("rms_norm_eps", 0.0, "rms_norm_eps must be positive"),
    ],
)
def test_config_rejects_invalid_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **{field: value})


def test_config_rejects_odd_head_size():
    with pytest.raises(ValueError, match="head_size 5"):
        LlamaConfig(hidden_size=30, num_heads=6, num_kv_heads=2)


def test_config_dict_round_trip():
    assert LlamaConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match="unknown LlamaConfig fields: rope_scaling"):
        LlamaConfig.from_dict({**CONFIG.to_dict(), "rope_scaling": 2.0})


def test_param_shapes_match_init(params):
    shapes = param_shapes(CONFIG)

    assert params["embeddings"]["word"].shape == shapes["embeddings"]["word"] == (53, 36)
    assert params["layers"][0]["query"]["kernel"].shape == (36, 36)
    assert params["layers"][0]["key"]["kernel"].shape == (36, 12)
    assert params["layers"][2]["down"]["kernel"].shape == (44, 36)
    assert "lm_head" not in params


def test_logits_shape_and_cache_shape(params):
    ids = random_ids(0)

    logits, cache = forward(params, CONFIG, PLAN, jnp.asarray(ids))

    assert logits.shape == (2, SEQ_LEN, CONFIG.vocab_size)
    assert len(cache) == CONFIG.num_layers
    for keys, values in cache:
        assert keys.shape == (2, CONFIG.num_kv_heads, SEQ_LEN, CONFIG.head_size)
        assert values.shape == keys.shape


@pytest.mark.parametrize("prefix_len", [1, 4, SEQ_LEN - 1])
def test_cached_steps_match_full_forward(params, prefix_len):
    ids = random_ids(1)
    full = logits_of(params, ids)

    logits, cache = forward(params, CONFIG, PLAN, jnp.asarray(ids[:, :prefix_len]))
    steps = [np.asarray(logits)]
    for position in range(prefix_len, SEQ_LEN):
        logits, cache = forward(params, CONFIG, PLAN, jnp.asarray(ids[:, position:position + 1]),
                                cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)

    assert cache[0][0].shape[2] == SEQ_LEN
    np.testing.assert_allclose(incremental, full, atol=ATOL, rtol=0)


def test_cached_chunk_matches_full_forward(params):
    ids = random_ids(2)
    full = logits_of(params, ids)

    _, cache = forward(params, CONFIG, PLAN, jnp.asarray(ids[:, :3]))
    chunk, _ = forward(params, CONFIG, PLAN, jnp.asarray(ids[:, 3:]), cache)

    np.testing.assert_allclose(np.asarray(chunk), full[:, 3:], atol=ATOL, rtol=0)


def test_later_tokens_leave_earlier_logits(params):
    ids = random_ids(3)
    changed = ids.copy()
    changed[:, 4:] = (changed[:, 4:] + 1) % CONFIG.vocab_size

    original = logits_of(params, ids)
    altered = logits_of(params, changed)

    np.testing.assert_array_equal(original[:, :4], altered[:, :4])
    assert np.abs(original[:, 4:] - altered[:, 4:]).max() > 1e-3


def test_grouped_heads_match_repeated_heads(params):
    # A model with one key/value head per query head, whose key and value kernels repeat
    # each group's head, must give the same logits: query head q uses key/value head q // 3.
    full_config = dataclasses.replace(CONFIG, num_kv_heads=CONFIG.num_heads)
    repeated = copy_tree(params)
    d, group = CONFIG.head_size, CONFIG.group_size
    for layer in repeated["layers"]:
        for name in ("key", "value"):
            kernel = layer[name]["kernel"].reshape(CONFIG.hidden_size, CONFIG.num_kv_heads, d)
            layer[name]["kernel"] = np.repeat(kernel, group, axis=1).reshape(
                CONFIG.hidden_size, CONFIG.num_heads * d
            )
    ids = random_ids(4)

    np.testing.assert_allclose(logits_of(repeated, ids, full_config), logits_of(params, ids),
                               atol=ATOL, rtol=0)


def test_one_hot_tokens_match_ids(params):
    ids = random_ids(5)
    one_hot = np.eye(CONFIG.vocab_size, dtype=np.float32)[ids]

    np.testing.assert_allclose(logits_of(params, one_hot), logits_of(params, ids), atol=ATOL,
                               rtol=0)


def test_padded_prompt_with_key_mask(params):
    # One prompt of 5 tokens padded to 7 on the right, then one generated token that must not
    # see the 2 padded positions and must sit at position 5, as in the unpadded run.
    real = random_ids(6, batch=1, length=6)
    prompt, next_token = real[:, :5], real[:, 5:]
    padded = np.concatenate([prompt, np.zeros((1, 2), np.int32)], axis=1)
    prompt_mask = np.array([[1, 1, 1, 1, 1, 0, 0]], np.float32)

    unpadded_logits, unpadded_cache = forward(params, CONFIG, PLAN, jnp.asarray(prompt))
    padded_logits, padded_cache = forward(params, CONFIG, PLAN, jnp.asarray(padded),
                                          key_mask=jnp.asarray(prompt_mask))
    expected_next, _ = forward(params, CONFIG, PLAN, jnp.asarray(next_token), unpadded_cache)
    step_mask = np.concatenate([prompt_mask, [[1.0]]], axis=1).astype(np.float32)
    padded_next, _ = forward(params, CONFIG, PLAN, jnp.asarray(next_token), padded_cache,
                             key_mask=jnp.asarray(step_mask), positions=np.array([5]))

    np.testing.assert_allclose(np.asarray(padded_logits)[:, :5], np.asarray(unpadded_logits),
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(padded_next), np.asarray(expected_next), atol=ATOL,
                               rtol=0)


def test_untied_head_uses_its_kernel():
    config = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    params = init_params(config, seed=2, scale=SCALE)
    hidden = np.random.default_rng(7).standard_normal((2, 3, CONFIG.hidden_size)).astype(
        np.float32
    )

    logits = np.asarray(lm_head(params, config, jnp.asarray(hidden)))

    assert params["lm_head"]["kernel"].shape == (CONFIG.hidden_size, CONFIG.vocab_size)
    np.testing.assert_allclose(logits, hidden @ params["lm_head"]["kernel"], rtol=1e-5,
                               atol=1e-5)


def test_tied_head_uses_embedding(params):
    hidden = np.random.default_rng(8).standard_normal((2, CONFIG.hidden_size)).astype(np.float32)

    logits = np.asarray(lm_head(params, CONFIG, jnp.asarray(hidden)))

    np.testing.assert_allclose(logits, hidden @ params["embeddings"]["word"].T, rtol=1e-5,
                               atol=1e-5)


def test_rotary_scores_depend_on_offset_only():
    rng = np.random.default_rng(9)
    query = rng.standard_normal(CONFIG.head_size).astype(np.float32)
    key = rng.standard_normal(CONFIG.head_size).astype(np.float32)

    def score(query_position, key_position):
        cos_q, sin_q = rotary_tables(np.array([query_position]), CONFIG.head_size, 10000.0)
        cos_k, sin_k = rotary_tables(np.array([key_position]), CONFIG.head_size, 10000.0)
        rotated_query = apply_rotary(jnp.asarray(query[None]), cos_q, sin_q)
        rotated_key = apply_rotary(jnp.asarray(key[None]), cos_k, sin_k)
        return float(jnp.sum(rotated_query * rotated_key))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(query @ key), abs=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rotary_preserves_norm():
    x = np.random.default_rng(10).standard_normal((4, CONFIG.head_size)).astype(np.float32)
    cos, sin = rotary_tables(np.arange(4) * 7, CONFIG.head_size, 10000.0)

    rotated = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))

    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rotary_tables_reject_float_positions():
    with pytest.raises(TypeError, match="positions must be integers"):
        rotary_tables(np.array([0.5]), CONFIG.head_size, 10000.0)


def test_generate_greedy_matches_full_forward_argmax(params):
    prompt = [int(token) for token in random_ids(11, batch=1, length=4)[0]]

    generated = generate_greedy(params, CONFIG, PLAN, prompt, max_new_tokens=5)

    expected = list(prompt)
    for _ in range(5):
        logits = logits_of(params, np.array([expected], np.int32))
        expected.append(int(np.argmax(logits[0, -1])))
    assert generated == expected[len(prompt):]


def test_generate_greedy_stops_at_stop_id(params):
    prompt = [3, 8, 13]
    first = generate_greedy(params, CONFIG, PLAN, prompt, max_new_tokens=1)[0]

    generated = generate_greedy(params, CONFIG, PLAN, prompt, max_new_tokens=6, stop_ids=[first])

    assert generated == [first]


def test_encoder_plan_rejected(params):
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)

    with pytest.raises(ValueError, match="not a decoder plan"):
        forward(params, CONFIG, plan, jnp.asarray(random_ids(12)))


def test_decoder_plan_rejected_by_encoder():
    config = BertConfig(vocab_size=50, hidden_size=12, num_layers=2, num_heads=3,
                        intermediate_size=20, max_positions=16)
    plan = OperatorPlan.preset("decoder-exact", 2)

    with pytest.raises(ValueError, match="is a decoder plan"):
        encode(init_bert_params(config), config, plan, np.zeros((1, 4), np.int32),
               np.ones((1, 4), np.float32))


def test_plan_layer_count_mismatch(params):
    plan = OperatorPlan.preset("decoder-exact", CONFIG.num_layers + 1)

    with pytest.raises(ValueError, match="has 4 layers, the model has 3"):
        forward(params, CONFIG, plan, jnp.asarray(random_ids(13)))


def test_cache_with_wrong_batch_rejected(params):
    _, cache = forward(params, CONFIG, PLAN, jnp.asarray(random_ids(14, batch=1)))

    with pytest.raises(ValueError, match="key/value cache of layer 0"):
        forward(params, CONFIG, PLAN, jnp.asarray(random_ids(15, batch=2, length=1)), cache)


def test_key_mask_with_wrong_length_rejected(params):
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 5\)"):
        forward(params, CONFIG, PLAN, jnp.asarray(random_ids(16)),
                key_mask=jnp.ones((2, 5), jnp.float32))


def test_positions_beyond_context_rejected(params):
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 64\)"):
        forward(params, CONFIG, PLAN, jnp.asarray(random_ids(17, length=2)),
                positions=np.array([62, 64]))


def test_decoder_exact_preset():
    assert PLAN.layers == (LayerPlan("silu", "softmax", "rmsnorm"),) * CONFIG.num_layers
    assert DECODER_EXACT_LAYER == LayerPlan("silu", "softmax", "rmsnorm")
    assert PLAN.embedding_normaliser is None
    assert PLAN.final_normaliser == "rmsnorm"
    assert PLAN.is_decoder


def test_decoder_plan_dict_round_trip():
    restored = OperatorPlan.from_dict(PLAN.to_dict())

    assert restored == PLAN
    assert restored.digest() == PLAN.digest()


def test_encoder_plan_dict_has_no_final_normaliser():
    # Encoder plans serialise as before decoders existed, so their digests are unchanged.
    data = OperatorPlan.preset("exact", 2).to_dict()

    assert set(data) == {"name", "embedding_normaliser", "layers"}


def test_plan_invalid_final_normaliser():
    with pytest.raises(ValueError, match="invalid final_normaliser 'rms'"):
        OperatorPlan("custom", PLAN.layers, embedding_normaliser=None, final_normaliser="rms")


# -- fixed-capacity cache: left-padded prompt, then one token per step ------------------------


def left_padded(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad [1, n] ids on the left to ``length`` with id 0; return (ids, key mask)."""
    padding = length - ids.shape[1]
    padded = np.concatenate([np.zeros((1, padding), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, padding)), np.ones((1, ids.shape[1]))], axis=1)
    return padded, mask.astype(np.float32)


def test_prefill_left_padding_matches_unpadded(params):
    prompt = random_ids(11, batch=1, length=5)
    padded, mask = left_padded(prompt, 9)

    logits, cache = prefill(params, CONFIG, PLAN, jnp.asarray(padded), jnp.asarray(mask),
                            capacity=13)
    expected = logits_of(params, prompt)[:, -1]

    np.testing.assert_allclose(np.asarray(logits), expected, atol=ATOL, rtol=0)
    assert cache[0][0].shape == (1, CONFIG.num_kv_heads, 13, CONFIG.head_size)
    assert not np.any(np.asarray(cache[1][1])[:, :, 9:])


def test_padded_rows_stay_finite(params):
    # Padded query rows would have no visible key without their own: 0/0 in softmax.
    padded, mask = left_padded(random_ids(12, batch=1, length=2), 6)

    logits, _ = forward(params, CONFIG, PLAN, jnp.asarray(padded), key_mask=jnp.asarray(mask))

    assert np.all(np.isfinite(np.asarray(logits)))


def test_decode_steps_match_growing_cache(params):
    prompt = random_ids(13, batch=1, length=4)
    followers = random_ids(14, batch=1, length=3)
    bucket, capacity = 7, 11
    padded, prompt_mask = left_padded(prompt, bucket)

    _, cache = prefill(params, CONFIG, PLAN, jnp.asarray(padded), jnp.asarray(prompt_mask),
                       capacity)
    # The plaintext reference: every position without padding, the cache grown by append.
    _, reference_cache = forward(params, CONFIG, PLAN, jnp.asarray(prompt))
    step = jax.jit(partial(decode_step, config=CONFIG, plan=PLAN))
    for count in range(followers.shape[1]):
        token = followers[:, count:count + 1]
        key_mask = np.zeros((1, capacity), np.float32)
        key_mask[:, :bucket] = prompt_mask
        key_mask[:, bucket:bucket + count + 1] = 1.0
        logits, cache = step(params, tokens=jnp.asarray(token), cache=cache,
                             key_mask=jnp.asarray(key_mask), index=jnp.int32(bucket + count))
        expected, reference_cache = forward(params, CONFIG, PLAN, jnp.asarray(token),
                                            reference_cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected)[:, -1], atol=ATOL,
                                   rtol=0, err_msg=f"step {count}")


def test_decode_step_rejects_wrong_key_mask(params):
    _, cache = prefill(params, CONFIG, PLAN, jnp.asarray(random_ids(15, batch=1, length=3)),
                       jnp.ones((1, 3), jnp.float32), capacity=6)

    with pytest.raises(ValueError, match=r"key_mask has shape \(1, 5\), expected \[1, 6\]"):
        decode_step(params, CONFIG, PLAN, jnp.zeros((1, 1), jnp.int32), cache,
                    jnp.ones((1, 5), jnp.float32), 3)


def test_prefill_rejects_capacity_below_prompt(params):
    with pytest.raises(ValueError, match="capacity must lie in"):
        prefill(params, CONFIG, PLAN, jnp.asarray(random_ids(16, batch=1, length=5)),
                jnp.ones((1, 5), jnp.float32), capacity=4)
