"""Imported MiniLM weights against the original framework (PyTorch transformers, CPU)."""

import numpy as np
import pytest

from cipherprompt.assets import asset_path
from cipherprompt.models.bert import BertConfig, encode
from cipherprompt.models.bert_import import load_bert_safetensors
from cipherprompt.plan import OperatorPlan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.real_model


def test_hidden_states_match_pytorch():
    config = BertConfig.from_hf_config(asset_path("minilm_config"))
    params = load_bert_safetensors(asset_path("minilm_weights"), config)
    plan = OperatorPlan.preset("reference", config.num_layers)
    rng = np.random.default_rng(7)
    ids = rng.integers(1000, config.vocab_size, size=(3, 11)).astype(np.int32)
    mask = np.ones((3, 11), np.float32)
    mask[1, 7:] = 0.0  # padded row: the mask must keep padding from changing real positions
    mask[2, 4:] = 0.0

    reference_model = transformers.BertModel.from_pretrained(
        str(asset_path("minilm_config").parent), add_pooling_layer=False
    ).eval()
    with torch.no_grad():
        expected = reference_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states

    _, hidden_states, _ = encode(params, config, plan, ids, mask)
    assert len(hidden_states) == len(expected) == config.num_layers + 1
    real = mask.astype(bool)
    for layer, (ours, theirs) in enumerate(zip(hidden_states, expected)):
        error = np.abs(np.asarray(ours)[real] - theirs.numpy()[real]).max()
        assert error < 1e-4, f"hidden state {layer}: max abs error {error:.2e}"


def test_exact_plan_differs_only_by_gelu_form():
    config = BertConfig.from_hf_config(asset_path("minilm_config"))
    params = load_bert_safetensors(asset_path("minilm_weights"), config)
    ids = np.random.default_rng(3).integers(1000, config.vocab_size, size=(2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.float32)
    reference, _, _ = encode(params, config, OperatorPlan.preset("reference", 6), ids, mask)
    exact, _, _ = encode(params, config, OperatorPlan.preset("exact", 6), ids, mask)
    difference = np.abs(np.asarray(reference) - np.asarray(exact)).max()
    assert 0.0 < difference < 0.05
