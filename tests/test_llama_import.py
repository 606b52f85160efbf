"""GGUF import on small files written here: name map, Q/K row order, quantised types, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from cipherprompt.models.llama import LlamaConfig, init_params, param_shapes
from cipherprompt.models.llama_import import (
    GGUFImportError,
    config_from_gguf,
    load_llama_gguf,
    name_map,
    open_gguf,
    undo_rotary_permutation,
)

# Dimensions are multiples of 32, Q8_0's block size, so every weight can be quantised.
CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=160,
    max_positions=128,
    rope_theta=50000.0,
    # GGUF stores float32 metadata; a power of two reads back unchanged.
    rms_norm_eps=2.0**-20,
)


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder rows as llama.cpp's converter does: each head's halves alternate row by row."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(config: LlamaConfig, params) -> dict[str, np.ndarray]:
    """The params as a GGUF file stores them: [out, in] weights, interleaved Q and K rows."""
    tensors = {
        "token_embd.weight": params["embeddings"]["word"],
        "output_norm.weight": params["final_norm"]["gamma"],
    }
    if not config.tie_word_embeddings:
        tensors["output.weight"] = params["lm_head"]["kernel"].T
    for index, layer in enumerate(params["layers"]):
        prefix = f"blk.{index}."
        tensors[prefix + "attn_norm.weight"] = layer["attention_norm"]["gamma"]
        tensors[prefix + "ffn_norm.weight"] = layer["mlp_norm"]["gamma"]
        tensors[prefix + "attn_q.weight"] = interleave_rotary_rows(
            layer["query"]["kernel"].T, config.num_heads
        )
        tensors[prefix + "attn_k.weight"] = interleave_rotary_rows(
            layer["key"]["kernel"].T, config.num_kv_heads
        )
        tensors[prefix + "attn_v.weight"] = layer["value"]["kernel"].T
        tensors[prefix + "attn_output.weight"] = layer["attention_output"]["kernel"].T
        tensors[prefix + "ffn_gate.weight"] = layer["gate"]["kernel"].T
        tensors[prefix + "ffn_up.weight"] = layer["up"]["kernel"].T
        tensors[prefix + "ffn_down.weight"] = layer["down"]["kernel"].T
    return tensors


def write_gguf(
    path: Path,
    config: LlamaConfig,
    tensors: dict[str, np.ndarray],
    architecture: str = "llama",
    quantise: gguf.GGMLQuantizationType | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value)
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if quantise is not None and value.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(value, quantise), raw_dtype=quantise)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leaves(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, path + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from leaves(value, path + (index,))
    else:
        yield path, tree


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=3, scale=0.5)


@pytest.fixture
def model_file(tmp_path, params):
    return write_gguf(tmp_path / "tiny.gguf", CONFIG, gguf_tensors(CONFIG, params))


def test_undo_rotary_permutation_inverts_converter():
    weight = np.arange(8 * 12 * 3, dtype=np.float32).reshape(8 * 12, 3)

    restored = undo_rotary_permutation(interleave_rotary_rows(weight, heads=8), heads=8)

    np.testing.assert_array_equal(restored, weight)


def test_undo_rotary_permutation_row_order():
    # One head of size 6: the file's rows 0, 3, 1, 4, 2, 5 come back as 0..5.
    stored = np.array([0, 3, 1, 4, 2, 5], np.float32)[:, None]

    assert undo_rotary_permutation(stored, heads=1)[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("tied", [True, False])
def test_name_map_covers_every_parameter(tied):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)

    expected = {path for path, _ in leaves(param_shapes(config))}
    mapping = name_map(config)
    names = [rule.gguf_name for rule in mapping.values()]

    assert set(mapping) == expected
    assert len(set(names)) == len(names)


def test_config_read_from_metadata(model_file):
    assert config_from_gguf(open_gguf(model_file)) == CONFIG


def test_round_trip_f32_exact(model_file, params):
    config, loaded = load_llama_gguf(model_file)

    assert config == CONFIG
    for path, value in leaves(params):
        restored = loaded
        for key in path:
            restored = restored[key]
        np.testing.assert_array_equal(restored, value, err_msg="/".join(map(str, path)))


def test_round_trip_q8_0_within_quantisation_error(tmp_path, params):
    path = write_gguf(tmp_path / "q8.gguf", CONFIG, gguf_tensors(CONFIG, params),
                      quantise=gguf.GGMLQuantizationType.Q8_0)

    _, loaded = load_llama_gguf(path)

    # Q8_0 stores blocks of 32 values as int8 times a float16 scale max|x| / 127, so a value is
    # off by at most half a step plus the scale's rounding: below 1% of the largest weight.
    for name in ("query", "key", "down"):
        original = params["layers"][1][name]["kernel"]
        error = np.abs(loaded["layers"][1][name]["kernel"] - original).max()
        assert 0.0 < error < 0.01 * np.abs(original).max(), name


def test_untied_output_loaded(tmp_path):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    params = init_params(config, seed=4, scale=0.5)
    path = write_gguf(tmp_path / "untied.gguf", config, gguf_tensors(config, params))

    loaded_config, loaded = load_llama_gguf(path)

    assert loaded_config.tie_word_embeddings is False
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_missing_tensor_named(tmp_path, params):
    tensors = gguf_tensors(CONFIG, params)
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", CONFIG, tensors)

    expected = r"'blk\.1\.ffn_up\.weight' \(for layers/1/up/kernel\) is missing"
    with pytest.raises(GGUFImportError, match=expected):
        load_llama_gguf(path)


def test_extra_tensor_named(tmp_path, params):
    tensors = gguf_tensors(CONFIG, params)
    tensors["blk.0.attn_q.bias"] = np.zeros(CONFIG.hidden_size, np.float32)
    path = write_gguf(tmp_path / "extra.gguf", CONFIG, tensors)

    with pytest.raises(GGUFImportError, match=r"unexpected tensors \['blk\.0\.attn_q\.bias'\]"):
        load_llama_gguf(path)


def test_misshaped_tensor_named(tmp_path, params):
    tensors = gguf_tensors(CONFIG, params)
    tensors["blk.0.attn_k.weight"] = np.zeros((CONFIG.hidden_size, CONFIG.hidden_size), np.float32)
    path = write_gguf(tmp_path / "misshaped.gguf", CONFIG, tensors)

    expected = r"'blk\.0\.attn_k\.weight' has shape \(64, 64\), expected \(32, 64\)"
    with pytest.raises(GGUFImportError, match=expected):
        load_llama_gguf(path)


def test_other_architecture_rejected(tmp_path, params):
    path = write_gguf(tmp_path / "gpt2.gguf", CONFIG, {}, architecture="gpt2")

    with pytest.raises(GGUFImportError, match="architecture is 'gpt2'; only 'llama'"):
        load_llama_gguf(path)


def test_rope_scaling_rejected(tmp_path, params):
    path = write_gguf(tmp_path / "scaled.gguf", CONFIG, gguf_tensors(CONFIG, params),
                      extra_metadata={"llama.rope.scaling.type": "linear"})

    with pytest.raises(GGUFImportError, match="rotary scaling 'linear' is not supported"):
        load_llama_gguf(path)


def test_expected_config_mismatch_rejected(model_file):
    with pytest.raises(GGUFImportError, match="expected LlamaConfig"):
        load_llama_gguf(model_file, dataclasses.replace(CONFIG, rope_theta=10000.0))


def test_non_gguf_file_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a gguf file at all" * 4)

    with pytest.raises(GGUFImportError, match="cannot read as a GGUF file"):
        open_gguf(path)
