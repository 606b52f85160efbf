"""Operator plans: presets, validation, serialisation and digest."""

from __future__ import annotations

import dataclasses

import pytest

from cipherprompt.plan import (
    DECODER_EXACT_LAYER,
    DECODER_FRIENDLY_LAYER,
    EXACT_LAYER,
    FRIENDLY_LAYER,
    PRESET_HELP,
    REFERENCE_LAYER,
    LayerPlan,
    OperatorPlan,
)

NUM_LAYERS = 5


def test_preset_exact_layers():
    plan = OperatorPlan.preset("exact", NUM_LAYERS)

    assert plan.name == "exact"
    assert plan.num_layers == NUM_LAYERS
    assert plan.layers == (LayerPlan("gelu_tanh", "softmax", "layernorm"),) * NUM_LAYERS
    assert plan.embedding_normaliser == "layernorm"


def test_preset_reference_layers():
    plan = OperatorPlan.preset("reference", NUM_LAYERS)

    assert plan.layers == (LayerPlan("gelu_erf", "softmax", "layernorm"),) * NUM_LAYERS
    assert REFERENCE_LAYER == LayerPlan("gelu_erf", "softmax", "layernorm")


def test_preset_friendly_layers():
    plan = OperatorPlan.preset("friendly", NUM_LAYERS)

    assert plan.layers == (LayerPlan("relu", "2quad", "layernorm"),) * NUM_LAYERS


@pytest.mark.parametrize("count", [1, 2, NUM_LAYERS])
def test_preset_friendly_first_k(count):
    plan = OperatorPlan.preset(f"friendly-first-{count}", NUM_LAYERS)

    assert plan.name == f"friendly-first-{count}"
    assert plan.num_layers == NUM_LAYERS
    assert plan.layers[:count] == (FRIENDLY_LAYER,) * count
    assert plan.layers[count:] == (EXACT_LAYER,) * (NUM_LAYERS - count)


@pytest.mark.parametrize("count", [0, NUM_LAYERS + 1])
def test_preset_friendly_first_out_of_range(count):
    with pytest.raises(ValueError) as raised:
        OperatorPlan.preset(f"friendly-first-{count}", NUM_LAYERS)

    message = str(raised.value)
    assert f"friendly-first-{count}" in message
    assert "friendly-first-1" in message
    assert f"friendly-first-{NUM_LAYERS}" in message


def test_preset_override_one_kind():
    plan = OperatorPlan.preset("exact+activation=relu", NUM_LAYERS)

    assert plan.name == "exact+activation=relu"
    assert plan.layers == (LayerPlan("relu", "softmax", "layernorm"),) * NUM_LAYERS
    assert plan.embedding_normaliser == "layernorm"


def test_preset_override_two_kinds():
    plan = OperatorPlan.preset(
        "friendly-first-2+layer_normaliser=l1_layernorm+activation=quad", NUM_LAYERS)

    assert plan.layers[:2] == (LayerPlan("quad", "2quad", "l1_layernorm"),) * 2
    assert plan.layers[2:] == (LayerPlan("quad", "softmax", "l1_layernorm"),) * (NUM_LAYERS - 2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("exact+activation", "KIND=NAME"),
        ("exact+norm=l1_layernorm", "KIND=NAME"),
        ("exact+activation=", "KIND=NAME"),
        ("exact+activation=relu+activation=quad", "replaces activation twice"),
        ("exact+activation=swish", "invalid activation 'swish'"),
        ("fast+activation=relu", "unknown operator plan 'fast'"),
    ],
)
def test_preset_override_invalid(name, expected):
    with pytest.raises(ValueError, match=expected):
        OperatorPlan.preset(name, NUM_LAYERS)


@pytest.mark.parametrize("name", ["fast", "friendly-first-", "friendly-first-x", "Exact"])
def test_preset_unknown_name_lists_presets(name):
    with pytest.raises(ValueError) as raised:
        OperatorPlan.preset(name, NUM_LAYERS)

    message = str(raised.value)
    assert repr(name) in message
    for preset in PRESET_HELP:
        assert preset in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("activation", "gelu"), ("attention_normaliser", "sparsemax"), ("layer_normaliser", "rms")],
)
def test_layer_plan_invalid_operator(field, value):
    arguments = {
        "activation": "quad",
        "attention_normaliser": "2quad",
        "layer_normaliser": "layernorm",
    }
    arguments[field] = value

    with pytest.raises(ValueError) as raised:
        LayerPlan(**arguments)

    message = str(raised.value)
    assert field in message
    assert repr(value) in message
    assert "valid choices" in message


def test_plan_invalid_embedding_normaliser():
    with pytest.raises(ValueError, match="embedding_normaliser 'rms'"):
        OperatorPlan("custom", (EXACT_LAYER,), embedding_normaliser="rms")


def test_plan_without_layers_rejected():
    with pytest.raises(ValueError, match="at least one layer"):
        OperatorPlan("empty", ())


@pytest.mark.parametrize("name", ["exact", "reference", "friendly", "friendly-first-3"])
def test_dict_round_trip(name):
    plan = OperatorPlan.preset(name, NUM_LAYERS)

    restored = OperatorPlan.from_dict(plan.to_dict())

    assert restored == plan
    assert restored.digest() == plan.digest()


def test_dict_round_trip_mean_centre_embedding():
    plan = OperatorPlan("custom", (FRIENDLY_LAYER, EXACT_LAYER), embedding_normaliser="mean_centre")

    assert OperatorPlan.from_dict(plan.to_dict()) == plan


def test_from_dict_missing_layers():
    with pytest.raises(ValueError, match="malformed operator plan"):
        OperatorPlan.from_dict({"name": "exact"})


def test_from_dict_unknown_layer_field():
    data = OperatorPlan.preset("exact", 2).to_dict()
    data["layers"][0]["dropout"] = 0.1

    with pytest.raises(ValueError, match="malformed operator plan"):
        OperatorPlan.from_dict(data)


def test_digest_stable_for_equal_plans():
    first = OperatorPlan.preset("friendly-first-2", NUM_LAYERS)
    second = OperatorPlan.preset("friendly-first-2", NUM_LAYERS)

    assert first is not second
    assert first.digest() == second.digest()
    assert len(first.digest()) == 64


def test_digest_changes_with_one_layer():
    plan = OperatorPlan.preset("exact", NUM_LAYERS)
    layers = list(plan.layers)
    layers[3] = dataclasses.replace(layers[3], activation="relu")
    changed = OperatorPlan(plan.name, tuple(layers))

    assert changed.digest() != plan.digest()


def test_digest_changes_with_layer_count():
    assert (
        OperatorPlan.preset("exact", NUM_LAYERS).digest()
        != OperatorPlan.preset("exact", NUM_LAYERS + 1).digest()
    )


def test_digest_changes_with_embedding_normaliser():
    plan = OperatorPlan.preset("exact", NUM_LAYERS)
    changed = dataclasses.replace(plan, embedding_normaliser="mean_centre")

    assert changed.digest() != plan.digest()


def test_preset_decoder_friendly_layers():
    plan = OperatorPlan.preset("decoder-friendly", NUM_LAYERS)

    assert plan.name == "decoder-friendly"
    assert plan.layers == (LayerPlan("hard_swish", "power_softmax", "rmsnorm"),) * NUM_LAYERS
    assert plan.layers[0] == DECODER_FRIENDLY_LAYER
    assert plan.embedding_normaliser is None
    assert plan.final_normaliser == "rmsnorm"
    assert plan.is_decoder


def test_decoder_presets_differ_only_in_layers():
    exact = OperatorPlan.preset("decoder-exact", NUM_LAYERS)
    friendly = OperatorPlan.preset("decoder-friendly", NUM_LAYERS)

    assert exact.layers[0] == DECODER_EXACT_LAYER
    assert friendly.digest() != exact.digest()
    assert dataclasses.replace(friendly, name=exact.name,
                               layers=exact.layers).digest() == exact.digest()


def test_decoder_friendly_round_trip():
    plan = OperatorPlan.preset("decoder-friendly", NUM_LAYERS)

    restored = OperatorPlan.from_dict(plan.to_dict())

    assert restored == plan
    assert restored.digest() == plan.digest()


def test_decoder_override_keeps_final_normaliser():
    plan = OperatorPlan.preset("decoder-friendly+activation=silu_piecewise", NUM_LAYERS)

    assert plan.layers == (LayerPlan("silu_piecewise", "power_softmax", "rmsnorm"),) * NUM_LAYERS
    assert plan.is_decoder
    assert plan.final_normaliser == "rmsnorm"
