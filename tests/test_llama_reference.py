"""Imported SmolLM2 GGUF against the original framework (PyTorch transformers, CPU).

transformers 5.25 reads GGUF files only with the accelerate package installed, which this
project does not use. The reference model is therefore built from transformers' own GGUF
reader (``load_gguf_checkpoint``: its config parser, its dequantisation through gguf, its
reversal of llama.cpp's Q/K row order and its tensor names) into ``LlamaForCausalLM``.
"""

from __future__ import annotations

import numpy as np
import pytest

from cipherprompt.assets import asset_path
from cipherprompt.llama_tokenizer import LlamaTokenizer
from cipherprompt.models.llama import forward, generate_greedy
from cipherprompt.models.llama_import import load_llama_gguf, open_gguf
from cipherprompt.plan import OperatorPlan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
# 24 tokens, digits and punctuation among them, so that later rotary positions are checked too.
LONG_PROMPT = "In 1889, the Eiffel Tower opened in Paris; it is 330 metres tall and"
# Both frameworks run float32 on the same dequantised weights, so only summation order differs.
# On these two prompts and two others (5 to 24 tokens, logits up to 42 in magnitude) the largest
# difference was 9.3e-5 (x86-64, 2 cores). A wrong RMSNorm epsilon (1e-6 for 1e-5) moved the
# logits by at least 1.2e-2, and a wrong rotary base (1e4 for 1e5) by more than 1.
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def ours():
    path = asset_path("smollm2_gguf")
    reader = open_gguf(path)
    config, params = load_llama_gguf(path, reader=reader)
    return config, params, LlamaTokenizer(path, reader=reader)


@pytest.fixture(scope="module")
def reference_model():
    from transformers.initialization import no_init_weights

    path = str(asset_path("smollm2_gguf"))
    metadata = gguf_utils.load_gguf_checkpoint(path)
    config = transformers.LlamaConfig(**metadata["config"])
    # Every weight is overwritten below, so random initialisation would only cost time.
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config)
    tensors = gguf_utils.load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    state = {name: torch.as_tensor(value) for name, value in tensors["tensors"].items()}
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    # The file has no output.weight: the head is tied to the embedding.
    assert result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    return model.eval()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_config_matches_transformers(ours, reference_model):
    config, _, _ = ours
    expected = reference_model.config

    assert config.num_layers == expected.num_hidden_layers == 30
    assert config.hidden_size == expected.hidden_size == 576
    assert config.num_heads == expected.num_attention_heads == 9
    assert config.num_kv_heads == expected.num_key_value_heads == 3
    assert config.intermediate_size == expected.intermediate_size
    assert config.vocab_size == expected.vocab_size == 49152
    assert config.rope_theta == expected.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == expected.rms_norm_eps
    assert config.tie_word_embeddings is True


def test_head_tied_in_reference(reference_model):
    head = reference_model.lm_head.weight
    embedding = reference_model.model.embed_tokens.weight

    assert torch.equal(head, embedding)


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT])
def test_logits_match_transformers(ours, reference_model, prompt):
    config, params, tokenizer = ours
    plan = OperatorPlan.preset("decoder-exact", config.num_layers)
    ids = tokenizer.encode(prompt)

    logits, _ = forward(params, config, plan, np.asarray([ids], np.int32))
    logits = np.asarray(logits[0])
    expected = reference_logits(reference_model, ids)

    assert logits.shape == expected.shape == (len(ids), config.vocab_size)
    last_error = np.abs(logits[-1] - expected[-1]).max()
    assert last_error < LOGIT_TOLERANCE, f"last position: max abs error {last_error:.2e}"
    all_error = np.abs(logits - expected).max()
    assert all_error < LOGIT_TOLERANCE, f"all positions: max abs error {all_error:.2e}"
    assert np.argmax(logits[-1]) == np.argmax(expected[-1])


def test_greedy_continuation_matches_transformers(ours, reference_model):
    config, params, tokenizer = ours
    plan = OperatorPlan.preset("decoder-exact", config.num_layers)
    ids = tokenizer.encode(PROMPT)

    generated = generate_greedy(params, config, plan, ids, max_new_tokens=8)
    with torch.no_grad():
        output = reference_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_id,
        )
    expected = output[0, len(ids):].tolist()

    assert generated == expected
    assert tokenizer.decode(generated).startswith(" Paris")
