"""Decoder perplexity on a tiny random decoder: float32, REF2K, agreement, checkpoints, lock."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from cipherprompt.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cipherprompt.corpus import TokenSplit, hamlet_text, windows
from cipherprompt.decoder_checkpoint import exact_checkpoint, load_decoder_checkpoint
from cipherprompt.evaluate import WorkDirInUseError, WorkDirLock
from cipherprompt.models.bert import BertConfig
from cipherprompt.models.bert import init_params as init_bert_params
from cipherprompt.models.llama import LlamaConfig, forward, generate_greedy, init_params
from cipherprompt.perplexity import (
    LOCK_NAME,
    REF2K_RESULTS,
    REPORT_NAME,
    PerplexityConfig,
    float_perplexity,
    greedy_continuations,
    measure_perplexity,
    prompt_windows,
)
from cipherprompt.plan import OperatorPlan

# Distinct sizes, so a transposed axis cannot pass: 6 query heads of size 6 in 2 groups of 3.
CONFIG = LlamaConfig(vocab_size=53, hidden_size=36, num_layers=3, num_heads=6, num_kv_heads=2,
                     intermediate_size=44, max_positions=64, rope_theta=10000.0)
SEQ_LEN = 16
# REF2K against float32 on the same windows. Measured 2.6e-5 (relative perplexity) and 0.026
# (largest logit difference) on this model; a wrong row, mask or layer order moves the
# perplexity by far more than 1%.
REF2K_RELATIVE_BOUND = 2e-3


def save_decoder(path: Path, plan_name: str, seed: int) -> Path:
    plan = OperatorPlan.preset(plan_name, CONFIG.num_layers)
    params = init_params(CONFIG, seed=seed, scale=0.3)
    save_checkpoint(path, Checkpoint(params, CONFIG, plan, SEQ_LEN, {"name": plan_name}))
    return path


@pytest.fixture(scope="module")
def exact_path(tmp_path_factory) -> Path:
    return save_decoder(tmp_path_factory.mktemp("exact") / "exact.npz", "decoder-exact", 1)


@pytest.fixture(scope="module")
def friendly_path(tmp_path_factory) -> Path:
    # The exact model's weights with friendly operators: close to it, but not equal.
    return save_decoder(tmp_path_factory.mktemp("friendly") / "friendly.npz", "decoder-friendly",
                        1)


@pytest.fixture(scope="module")
def split() -> TokenSplit:
    rng = np.random.default_rng(4)
    return TokenSplit.by_position(rng.integers(0, CONFIG.vocab_size, 1000), 0.2)


@pytest.fixture(scope="module")
def report(tmp_path_factory, friendly_path, exact_path, split):
    config = PerplexityConfig(checkpoint=friendly_path, work_dir=tmp_path_factory.mktemp("run"),
                              reference=exact_path, seq_len=SEQ_LEN, ref2k_windows=3,
                              ref2k_batch=2, prompts=3, prompt_len=8, new_tokens=6)
    return config, measure_perplexity(config, split)


def independent_perplexity(checkpoint: Checkpoint, ids: np.ndarray) -> float:
    """exp(mean NLL) from a whole-model forward pass and a float64 log-softmax in NumPy."""
    logits, _ = forward(checkpoint.params, CONFIG, checkpoint.plan, jnp.asarray(ids))
    logits = np.asarray(logits, np.float64)[:, :-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = ids[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(np.exp(nll.mean()))


@pytest.mark.parametrize("plan_fixture", ["exact_path", "friendly_path"])
def test_float_perplexity_equals_exp_mean_nll(plan_fixture, request, split):
    checkpoint = load_checkpoint(request.getfixturevalue(plan_fixture))
    ids = windows(split.held_out, SEQ_LEN)

    figures = float_perplexity(checkpoint, ids)

    assert figures["predicted_tokens"] == len(ids) * (SEQ_LEN - 1)
    assert figures["perplexity"] == pytest.approx(independent_perplexity(checkpoint, ids),
                                                  rel=1e-5)


def test_report_float_section(report, split):
    _, result = report

    assert result["float32"]["windows"] == len(split.held_out) // SEQ_LEN
    assert result["data"]["held_out_tokens"] == 200
    assert result["checkpoint"]["plan"] == "decoder-friendly"


def test_ref2k_perplexity_close_to_float(report):
    _, result = report
    ref2k = result["ref2k"]

    assert ref2k["windows"] == 3
    assert ref2k["predicted_tokens"] == 3 * (SEQ_LEN - 1)
    assert abs(ref2k["relative_difference"]) < REF2K_RELATIVE_BOUND
    assert ref2k["perplexity"] == pytest.approx(ref2k["float32_perplexity_same_windows"],
                                                rel=REF2K_RELATIVE_BOUND)
    assert 0.0 < ref2k["max_logit_difference"] < 0.1
    assert ref2k["engine"]["protocol"] == "REF2K"
    assert ref2k["engine"]["fraction_bits"] == 18


def test_ref2k_float_figure_is_prefix_of_all_windows(report, friendly_path, split):
    _, result = report
    checkpoint = load_checkpoint(friendly_path)
    first = windows(split.held_out, SEQ_LEN)[:3]

    assert result["ref2k"]["float32_perplexity_same_windows"] == pytest.approx(
        independent_perplexity(checkpoint, first), rel=1e-5)


def test_ref2k_rerun_skips_finished_windows(report, split):
    config, result = report

    again = measure_perplexity(config, split)

    assert again["ref2k"]["windows_this_run"] == 0
    assert again["ref2k"]["perplexity"] == result["ref2k"]["perplexity"]
    lines = (config.work_dir / REF2K_RESULTS).read_text().splitlines()
    assert len(lines) == 3
    assert all("nll_sum" in json.loads(line) for line in lines)


def test_reference_section(report):
    _, result = report
    reference = result["reference"]

    assert reference["plan"] == "decoder-exact"
    assert reference["perplexity_ratio"] == pytest.approx(
        result["float32"]["perplexity"] / reference["float32"]["perplexity"])
    assert 0.0 <= reference["next_token_agreement"] <= 1.0
    greedy = reference["greedy"]
    assert greedy["prompts"] == 3
    assert greedy["new_tokens"] == 6
    assert len(greedy["per_prompt"]) == 3
    assert greedy["equal_fraction"] == pytest.approx(
        np.mean([row["equal_fraction"] for row in greedy["per_prompt"]]))


def test_report_written(report):
    config, result = report
    saved = json.loads((config.work_dir / REPORT_NAME).read_text())

    assert saved["float32"]["perplexity"] == result["float32"]["perplexity"]
    assert "nll" not in saved["float32"]
    assert not (config.work_dir / LOCK_NAME).read_text().strip()


def test_greedy_continuations_match_cached_generation(exact_path, split):
    checkpoint = load_checkpoint(exact_path)
    prompts = prompt_windows(split.held_out, 3, 5)

    continued = greedy_continuations(checkpoint, prompts, 7)

    for prompt, tokens in zip(prompts, continued):
        expected = generate_greedy(checkpoint.params, CONFIG, checkpoint.plan,
                                   prompt.tolist(), 7)
        assert tokens.tolist() == expected


def test_model_agrees_with_itself(tmp_path, exact_path, split):
    config = PerplexityConfig(checkpoint=exact_path, work_dir=tmp_path, reference=exact_path,
                              seq_len=SEQ_LEN, ref2k_windows=0, prompts=2, prompt_len=6,
                              new_tokens=5)

    result = measure_perplexity(config, split)

    assert "ref2k" not in result
    assert result["reference"]["perplexity_ratio"] == 1.0
    assert result["reference"]["next_token_agreement"] == 1.0
    assert result["reference"]["greedy"]["equal_fraction"] == 1.0


def test_prompts_spread_over_held_out(split):
    prompts = prompt_windows(split.held_out, 3, 8)
    chunks = windows(split.held_out, 8)

    assert prompts.shape == (3, 8)
    np.testing.assert_array_equal(prompts[0], chunks[0])
    np.testing.assert_array_equal(prompts[-1], chunks[-1])


def test_work_dir_in_use_raises(tmp_path, exact_path, split):
    config = PerplexityConfig(checkpoint=exact_path, work_dir=tmp_path, seq_len=SEQ_LEN,
                              ref2k_windows=0, prompts=0)

    with WorkDirLock(tmp_path / LOCK_NAME, run_name="perplexity"):
        with pytest.raises(WorkDirInUseError, match="in use by the perplexity run"):
            measure_perplexity(config, split)


def test_classifier_checkpoint_rejected(tmp_path, split):
    bert = BertConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3,
                      intermediate_size=40, max_positions=32)
    path = tmp_path / "classifier.npz"
    save_checkpoint(path, Checkpoint(init_bert_params(bert), bert,
                                     OperatorPlan.preset("exact", 2), 16))

    with pytest.raises(CheckpointError, match="contains a classifier, not a decoder"):
        load_decoder_checkpoint(path)


def test_encoder_plan_in_decoder_checkpoint_rejected(tmp_path):
    path = tmp_path / "mixed.npz"
    save_checkpoint(path, Checkpoint(init_params(CONFIG), CONFIG,
                                     OperatorPlan.preset("exact", CONFIG.num_layers), SEQ_LEN))

    with pytest.raises(CheckpointError, match="not a decoder plan"):
        load_decoder_checkpoint(path)


def test_decoder_checkpoint_round_trip(exact_path):
    checkpoint = load_decoder_checkpoint(exact_path)

    assert checkpoint.config == CONFIG
    assert checkpoint.plan == OperatorPlan.preset("decoder-exact", CONFIG.num_layers)
    assert len(checkpoint.params["layers"]) == CONFIG.num_layers
    expected = init_params(CONFIG, seed=1, scale=0.3)
    np.testing.assert_array_equal(checkpoint.params["layers"][2]["down"]["kernel"],
                                  expected["layers"][2]["down"]["kernel"])


def test_missing_explicit_checkpoint_not_written(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        exact_checkpoint(tmp_path, tmp_path / "absent.npz")

    assert not (tmp_path / "absent.npz").exists()


def test_split_by_position():
    split = TokenSplit.by_position(np.arange(105), 0.1)

    np.testing.assert_array_equal(split.train, np.arange(95))
    np.testing.assert_array_equal(split.held_out, np.arange(95, 105))
    assert split.describe()["rule"] == "tokens [0, 95) train, tokens [95, 105) are held out"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_invalid_fraction(fraction):
    with pytest.raises(ValueError, match="held_out_fraction must be in"):
        TokenSplit.by_position(np.arange(10), fraction)


def test_windows_drop_remainder():
    result = windows(np.arange(23), 5)

    assert result.shape == (4, 5)
    np.testing.assert_array_equal(result[1], np.arange(5, 10))
    assert windows(np.arange(23), 5, limit=2).shape == (2, 5)
    with pytest.raises(ValueError, match="do not fill one window"):
        windows(np.arange(4), 5)


def test_hamlet_text_starts_at_act_one():
    text = hamlet_text()

    assert text.startswith("ACT I\n")
    assert "Shakespeare homepage" not in text
    assert text.rstrip().endswith("peal of ordnance is shot off")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("seq_len", 1, "seq_len must be at least 2"), ("ref2k_windows", -1, "0 or more"),
     ("ref2k_batch", 0, "at least 1"), ("windows", 0, "at least 1 or None")],
)
def test_config_rejects_invalid_value(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        PerplexityConfig(checkpoint=tmp_path, work_dir=tmp_path, **{field: value})
