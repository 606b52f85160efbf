"""The JAX BERT classifier on a tiny random model: embedding paths, padding and input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherprompt.models.bert import (
    BertConfig,
    classifier_blocks,
    classify,
    encode,
    encoder_layer,
    init_params,
    one_hot,
    pooling_weights,
)
from cipherprompt.plan import OperatorPlan

CONFIG = BertConfig(
    vocab_size=50,
    hidden_size=24,
    num_layers=2,
    num_heads=3,
    intermediate_size=40,
    max_positions=16,
    num_labels=3,
)
# Larger than BERT's 0.02, so that logits depend visibly on the tokens and a leak of padding
# into real positions moves them by far more than the tolerance.
PARAMS = init_params(CONFIG, seed=0, scale=0.3)
TEXT = np.array([2, 17, 33, 8, 41], np.int32)
PAD_ID = 0


def padded_batch(texts, length, pad_ids=None):
    """Token ids and 0/1 mask [batch, length] with each text padded at the end."""
    ids = np.full((len(texts), length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), length), np.float32)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = text
        mask[row, : len(text)] = 1.0
        if pad_ids is not None:
            ids[row, len(text):] = pad_ids[: length - len(text)]
    return ids, mask


def logits(plan_name, ids, mask, one_hot_input=False):
    plan = OperatorPlan.preset(plan_name, CONFIG.num_layers)
    tokens = one_hot(ids, CONFIG.vocab_size) if one_hot_input else ids
    result = classify(PARAMS, CONFIG, plan, jnp.asarray(tokens), jnp.asarray(mask),
                      jnp.asarray(pooling_weights(mask)))
    return np.asarray(result)


@pytest.mark.parametrize("plan_name", ["exact", "friendly"])
def test_one_hot_matches_integer_ids(plan_name):
    ids, mask = padded_batch([TEXT, TEXT[:3]], 7)

    from_ids = logits(plan_name, ids, mask)
    from_one_hot = logits(plan_name, ids, mask, one_hot_input=True)

    assert from_ids.shape == (2, CONFIG.num_labels)
    np.testing.assert_allclose(from_one_hot, from_ids, atol=1e-5, rtol=0)


@pytest.mark.parametrize("plan_name", ["exact", "friendly"])
def test_logits_ignore_padding_length(plan_name):
    short_ids, short_mask = padded_batch([TEXT], 7)
    long_ids, long_mask = padded_batch([TEXT], 11)

    short = logits(plan_name, short_ids, short_mask)
    long = logits(plan_name, long_ids, long_mask)

    np.testing.assert_allclose(long, short, atol=1e-5, rtol=0)


def test_logits_ignore_padded_token_ids():
    plain_ids, mask = padded_batch([TEXT], 11)
    noisy_ids, _ = padded_batch([TEXT], 11, pad_ids=np.array([9, 48, 3, 27, 11, 30], np.int32))

    plain = logits("exact", plain_ids, mask)
    noisy = logits("exact", noisy_ids, mask)

    np.testing.assert_allclose(noisy, plain, atol=1e-5, rtol=0)


def test_logits_depend_on_text():
    # Without this, the padding tests above could pass on a model whose output is constant.
    first_ids, first_mask = padded_batch([TEXT], 7)
    second_ids, second_mask = padded_batch([TEXT[::-1]], 7)

    first = logits("exact", first_ids, first_mask)
    second = logits("exact", second_ids, second_mask)

    assert np.max(np.abs(first - second)) > 1e-2


def test_encode_shapes():
    ids, mask = padded_batch([TEXT, TEXT[:2]], 7)
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)

    hidden, hidden_states, attentions = encode(PARAMS, CONFIG, plan, jnp.asarray(ids),
                                               jnp.asarray(mask))

    assert hidden.shape == (2, 7, CONFIG.hidden_size)
    assert len(hidden_states) == CONFIG.num_layers + 1
    assert len(attentions) == CONFIG.num_layers
    assert attentions[0].shape == (2, CONFIG.num_heads, 7, 7)
    np.testing.assert_array_equal(np.asarray(attentions[1])[1, :, :, 2:], 0.0)


def test_encode_rejects_plan_layer_count():
    ids, mask = padded_batch([TEXT], 7)
    plan = OperatorPlan.preset("exact", CONFIG.num_layers + 1)

    with pytest.raises(ValueError) as raised:
        encode(PARAMS, CONFIG, plan, jnp.asarray(ids), jnp.asarray(mask))

    message = str(raised.value)
    assert f"{CONFIG.num_layers + 1} layers" in message
    assert f"model has {CONFIG.num_layers}" in message


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="hidden_size 24 is not divisible by num_heads 5"):
        BertConfig(hidden_size=24, num_heads=5)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_layers", "num_heads"])
def test_config_rejects_zero_size(field):
    with pytest.raises(ValueError, match=f"BertConfig.{field} must be positive"):
        BertConfig(**{field: 0})


def test_config_rejects_dropout_one():
    with pytest.raises(ValueError, match="dropout"):
        BertConfig(dropout=1.0)


def test_config_dict_round_trip():
    assert BertConfig.from_dict(CONFIG.to_dict()) == CONFIG


def test_config_from_dict_unknown_field():
    data = {**CONFIG.to_dict(), "num_experts": 4}

    with pytest.raises(ValueError, match="num_experts"):
        BertConfig.from_dict(data)


def test_one_hot_rows():
    ids = np.array([[0, 3], [49, 3]])

    rows = one_hot(ids, CONFIG.vocab_size)

    assert rows.shape == (2, 2, CONFIG.vocab_size)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(rows.argmax(axis=-1), ids)


@pytest.mark.parametrize("bad_id", [-1, 50])
def test_one_hot_rejects_out_of_range(bad_id):
    ids = np.array([[1, bad_id, 2]])

    with pytest.raises(ValueError) as raised:
        one_hot(ids, CONFIG.vocab_size)

    message = str(raised.value)
    assert "[0, 50)" in message
    assert str(bad_id) in message


def test_pooling_weights_mean():
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)

    weights = pooling_weights(mask)

    np.testing.assert_allclose(weights[0], [0.25, 0.25, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(weights[1], [0.5, 0.5, 0.0, 0.0, 0.0])


def test_pooling_weights_rejects_empty_row():
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)

    with pytest.raises(ValueError, match="at least one real token"):
        pooling_weights(mask)


def _block_params(params, path):
    for key in path:
        params = params[key]
    return params


@pytest.mark.parametrize("plan_name", ["exact", "friendly"])
def test_steps_one_by_one_match_fused(plan_name):
    # The profiler compiles every step as its own program and passes only the state entries
    # that a step declares it reads. Running the steps that way must give the fused logits.
    ids, mask = padded_batch([TEXT, TEXT[:3]], 7)
    plan = OperatorPlan.preset(plan_name, CONFIG.num_layers)
    state = {"tokens": jnp.asarray(one_hot(ids, CONFIG.vocab_size)), "mask": jnp.asarray(mask),
             "pool": jnp.asarray(pooling_weights(mask))}
    steps_run = 0

    for block in classifier_blocks(CONFIG, plan):
        weights = _block_params(PARAMS, block.param_path)
        for step in block.steps:
            inputs = {key: state[key] for key in step.reads}
            run = jax.jit(lambda w, s, step=step, block=block: step(w, CONFIG, block.plan, s))
            state.update({key: run(weights, inputs)[key] for key in step.writes})
            steps_run += 1

    assert steps_run == 2 + 10 * CONFIG.num_layers + 1
    expected = logits(plan_name, ids, mask, one_hot_input=True)
    np.testing.assert_allclose(np.asarray(state["logits"]), expected, atol=1e-5, rtol=0)


def test_blocks_follow_model_scopes():
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)

    blocks = classifier_blocks(CONFIG, plan)

    assert [block.scope for block in blocks] == ["embedding", "layer0", "layer1", "head"]
    operators = {step.operator for block in blocks for step in block.steps}
    assert operators == {"embedding", "linear", "attention_products", "attention_normaliser",
                         "activation", "layer_normaliser", "head"}


def test_encoder_layer_rejects_wrong_dropout_keys():
    ids, mask = padded_batch([TEXT], 7)
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)
    x = jnp.zeros((1, 7, CONFIG.hidden_size))
    keys = tuple(jax.random.split(jax.random.PRNGKey(0), 2))

    with pytest.raises(ValueError):
        encoder_layer(PARAMS["layers"][0], CONFIG, plan.layers[0], x, jnp.asarray(mask), keys)
