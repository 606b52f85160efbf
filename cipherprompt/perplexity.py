"""Held-out perplexity of a decoder checkpoint in plaintext float32 and in SPU's REF2K protocol.

``cipherprompt perplexity`` measures one decoder checkpoint on the held-out part of Hamlet
(``corpus``), cut into windows of ``seq_len`` tokens:

1. float32: plaintext JAX on every held-out window. Perplexity is exp of the mean negative
   log-likelihood of each window's tokens 1..seq_len-1 given the tokens before them.
2. REF2K: the same windows' logits under SPU's plaintext fixed-point protocol, with the engine
   settings of the private runs (``EngineConfig`` with protocol REF2K), one compiled stage per
   layer plus the head, inside this process. The embedding lookup runs outside SPU: a product
   with a one-hot row selects a table row exactly in fixed point, so the stages start from the
   embedded rows. Each finished window is appended to ``ref2k.jsonl`` and skipped on a rerun.
3. Agreement with a reference model (by default the exact decoder): the share of held-out
   positions whose most likely next token is the same (teacher-forced), and the share of equal
   tokens when both models greedily continue a few held-out prompts.

jax and SPU are imported inside the functions that use them, so that building the CLI parser
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cipherprompt.corpus import DEFAULT_HELD_OUT_FRACTION, TokenSplit, load_hamlet_split, windows
from cipherprompt.decoder_checkpoint import (
    DEFAULT_SEQ_LEN,
    exact_checkpoint,
    load_decoder_checkpoint,
)

if TYPE_CHECKING:
    import jax

    from cipherprompt.checkpoint import Checkpoint
    from cipherprompt.models.llama import LlamaConfig, Params
    from cipherprompt.plan import LayerPlan, OperatorPlan
    from cipherprompt.secure.engine import EngineConfig

log = logging.getLogger(__name__)

REPORT_NAME = "perplexity-report.json"
LOCK_NAME = "perplexity.lock"
REF2K_RESULTS = "ref2k.jsonl"
# Windows per float32 batch: the logits of 4 windows of 128 tokens over SmolLM2's 49,152-token
# vocabulary take 100 MB.
FLOAT_BATCH = 4


# ---------------------------------------------------------------------------------------------
# Plaintext evaluation, one layer at a time.


class WindowRunner:
    """Jitted pieces of a decoder for batches of whole windows of ``seq_len`` tokens.

    One layer function is compiled per operator choice and applied to each layer's weights in
    turn, so a 30-layer model needs one or two layer compilations rather than one of the whole
    unrolled model. Windows have no padding: the mask is causal only, positions start at 0.
    """

    def __init__(self, config: LlamaConfig, seq_len: int):
        from cipherprompt.models.llama import attention_mask, rotary_tables

        if not 2 <= seq_len <= config.max_positions:
            raise ValueError(f"seq_len must be in 2..{config.max_positions}, got {seq_len}")
        self.config = config
        self.seq_len = seq_len
        cos, sin = rotary_tables(np.arange(seq_len)[None, :], config.head_size, config.rope_theta)
        self.rotary = (cos[:, None], sin[:, None])
        self.mask = attention_mask(0, seq_len)
        self._layers: dict = {}
        self._heads: dict = {}

    def embed(self, params: Params, ids: np.ndarray) -> jax.Array:
        import jax.numpy as jnp

        return jnp.take(params["embeddings"]["word"], jnp.asarray(ids), axis=0)

    def layer_function(self, layer_plan: LayerPlan):
        """Return the jitted ``f(layer_params, x) -> x`` of one layer with ``layer_plan``."""
        if layer_plan not in self._layers:
            import jax

            self._layers[layer_plan] = jax.jit(
                lambda layer_params, x: self.apply_layer(layer_params, layer_plan, x))
        return self._layers[layer_plan]

    def apply_layer(self, layer_params: Params, layer_plan: LayerPlan, x: jax.Array) -> jax.Array:
        """Run one layer on [batch, seq_len, hidden] states (traceable, for gradients too)."""
        import jax.numpy as jnp

        from cipherprompt.models.llama import decoder_layer

        config = self.config
        empty = jnp.zeros((x.shape[0], config.num_kv_heads, 0, config.head_size), x.dtype)
        output, _ = decoder_layer(layer_params, config, layer_plan, x, (empty, empty), self.mask,
                                  self.rotary)
        return output

    def head_function(self, plan: OperatorPlan):
        """Return the jitted ``f(params, x, ids) -> (nll, predictions)``, each [batch, seq-1].

        ``x`` are the last layer's outputs; row i of ``nll`` is -log p(ids[i, t+1] | ids[i, :t+1])
        and ``predictions`` the most likely next tokens. Only the plan's final normaliser matters.
        """
        if plan.final_normaliser not in self._heads:
            import jax

            self._heads[plan.final_normaliser] = jax.jit(
                lambda params, x, ids: self.next_token_nll(params, plan, x, ids))
        return self._heads[plan.final_normaliser]

    def logits(self, params: Params, plan: OperatorPlan, x: jax.Array) -> jax.Array:
        """Final norm and output head: [batch, seq, hidden] to logits [batch, seq, vocab]."""
        from cipherprompt.models.llama import final_norm, lm_head

        return lm_head(params, self.config, final_norm(params, self.config, plan, x))

    def next_token_nll(self, params: Params, plan: OperatorPlan, x: jax.Array,
                       ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        import jax
        import jax.numpy as jnp

        logits = self.logits(params, plan, x[:, :-1])
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        return nll, jnp.argmax(logits, axis=-1)

    def run_layers(self, params: Params, plan: OperatorPlan, x: jax.Array,
                   start: int = 0) -> jax.Array:
        """Run layers ``start`` onwards on [batch, seq, hidden] states; return the last output."""
        for index in range(start, len(plan.layers)):
            x = self.layer_function(plan.layers[index])(params["layers"][index], x)
        return x

    def hidden_states(self, params: Params, plan: OperatorPlan, ids: np.ndarray) -> jax.Array:
        """Run every layer; return the last layer's output [batch, seq, hidden]."""
        return self.run_layers(params, plan, self.embed(params, ids))

    def window_statistics(self, params: Params, plan: OperatorPlan, ids: np.ndarray,
                          states: jax.Array | None = None, start: int = 0,
                          batch: int = FLOAT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Return (nll float64, predictions int32), each [windows, seq_len - 1].

        With ``states``, the hidden states of ``ids`` at the input of layer ``start``, only
        the layers from ``start`` on run.
        """
        head = self.head_function(plan)
        nll, predictions = [], []
        for first in range(0, len(ids), batch):
            rows = ids[first:first + batch]
            if states is None:
                x = self.hidden_states(params, plan, rows)
            else:
                x = self.run_layers(params, plan, states[first:first + batch], start)
            batch_nll, batch_predictions = head(params, x, rows)
            nll.append(np.asarray(batch_nll, np.float64))
            predictions.append(np.asarray(batch_predictions, np.int32))
        return np.concatenate(nll), np.concatenate(predictions)


def perplexity_of(nll: np.ndarray) -> float:
    """exp(mean negative log-likelihood) over every predicted token in ``nll``."""
    return float(np.exp(np.mean(nll)))


def float_perplexity(checkpoint: Checkpoint, ids: np.ndarray) -> dict:
    """Plaintext float32 perplexity of ``checkpoint`` on the windows ``ids`` [windows, seq]."""
    import jax
    import jax.numpy as jnp

    started = time.perf_counter()
    runner = WindowRunner(checkpoint.config, ids.shape[1])
    params = jax.tree_util.tree_map(jnp.asarray, checkpoint.params)
    nll, predictions = runner.window_statistics(params, checkpoint.plan, ids)
    return {
        "perplexity": perplexity_of(nll),
        "mean_nll": float(nll.mean()),
        "windows": int(len(ids)),
        "predicted_tokens": int(nll.size),
        "seconds": time.perf_counter() - started,
        "nll": nll,
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------------------------
# REF2K: the fixed-point reference run.


class DecoderReferenceRunner:
    """The decoder's layers and head as SPU stages under REF2K, in this process.

    One runtime with world size 1 on an in-memory link keeps every weight for all batches, as
    ``evaluate.ReferenceRunner`` does for the classifier. Each call infeeds one batch of
    embedded windows and runs one stage per layer, then the head, which returns the logits.
    """

    def __init__(self, checkpoint: Checkpoint, engine: EngineConfig, batch: int, seq_len: int):
        from cipherprompt.evaluate import reference_runtime
        from cipherprompt.secure.engine import named_weights

        if engine.protocol != "REF2K":
            raise ValueError(f"DecoderReferenceRunner needs protocol REF2K, got "
                             f"{engine.protocol!r}")
        self.batch = batch
        self.seq_len = seq_len
        self.params = checkpoint.params
        self.stages = compile_decoder_stages(checkpoint.config, checkpoint.plan, seq_len, engine,
                                             batch)
        self._runtime, self._io, self._link = reference_runtime(engine)
        for name, value in named_weights(checkpoint.params).items():
            self._set(name, value)

    def _set(self, name: str, value: np.ndarray) -> None:
        from spu.libspu import Visibility

        shares = self._io.make_shares(np.ascontiguousarray(value, np.float32),
                                      Visibility.VIS_SECRET, owner_rank=0)
        self._runtime.set_var(name, shares[0])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Return REF2K logits [rows, seq_len, vocab] of up to ``batch`` windows ``ids``."""
        rows = len(ids)
        if not 1 <= rows <= self.batch or ids.shape[1] != self.seq_len:
            raise ValueError(f"expected 1..{self.batch} windows of {self.seq_len} tokens, got "
                             f"shape {ids.shape}")
        if rows < self.batch:
            # The program has a fixed batch: fill it with copies of the last window.
            ids = np.concatenate([ids, np.repeat(ids[-1:], self.batch - rows, axis=0)])
        embedded = np.take(np.asarray(self.params["embeddings"]["word"]), ids, axis=0)
        self._set(EMBEDDED_INPUT, embedded)
        previous = EMBEDDED_INPUT
        for stage in self.stages:
            self._runtime.run(stage.executable)
            self._runtime.del_var(previous)
            previous = stage.output_name
        output = self._runtime.get_var(previous)
        self._runtime.del_var(previous)
        return np.asarray(self._io.reconstruct([output]), np.float32)[:rows]


EMBEDDED_INPUT = "hidden:embedding"


def compile_decoder_stages(config: LlamaConfig, plan: OperatorPlan, seq_len: int,
                           engine: EngineConfig, batch: int) -> list:
    """Compile one SPU stage per layer and a head stage for ``batch`` windows of ``seq_len``.

    Stage inputs are the weights (``param:<path>``, as ``secure.engine.named_weights`` names
    them) and the previous stage's output; the first layer reads ``hidden:embedding``.
    """
    from cipherprompt.models.llama import init_params
    from cipherprompt.secure.engine import compile_stage

    runner = WindowRunner(config, seq_len)
    params = init_params(config, seed=0)
    hidden = np.zeros((batch, seq_len, config.hidden_size), np.float32)
    stages = []
    previous = EMBEDDED_INPUT
    for index, layer_plan in enumerate(plan.layers):

        def layer(layer_params, x, layer_plan=layer_plan, index=index):
            import jax

            with jax.named_scope(f"layer{index}"):
                return runner.apply_layer(layer_params, layer_plan, x)

        stages.append(compile_stage(f"layer{index}", layer, ("layers", index),
                                    params["layers"][index], {}, (previous, hidden),
                                    f"hidden:layer{index}", engine))
        previous = stages[-1].output_name

    # The final norm and the output projection: the embedding table when the head is tied.
    head_names = ("final_norm", "lm_head") if "lm_head" in params else ("final_norm", "embeddings")

    def head(head_params, x):
        return runner.logits(head_params, plan, x)

    stages.append(compile_stage("head", head, (), {name: params[name] for name in head_names}, {},
                                (previous, hidden), "logits", engine))
    return stages


def window_key(ids: np.ndarray) -> str:
    """Text that identifies a window in the REF2K result file; only its SHA-256 is stored."""
    return " ".join(str(int(token)) for token in ids)


def run_reference(checkpoint: Checkpoint, engine: EngineConfig, ids: np.ndarray,
                  float_logits_of, results, batch: int) -> dict:
    """Fill ``results`` (an ``evaluate.ResultLog``) with REF2K figures of every window in ``ids``.

    ``float_logits_of(rows)`` returns the float32 logits of windows, for the per-window
    comparison. Returns the compile and run seconds of this call.
    """
    from cipherprompt.evaluate import fill_reference_results

    def run_rows(runner: DecoderReferenceRunner, rows: list[int]) -> list[dict]:
        started = time.perf_counter()
        fixed = runner.logits(ids[rows])
        seconds = (time.perf_counter() - started) / len(rows)
        reference = float_logits_of(ids[rows])
        return [_ref2k_record(index, ids[index], fixed_logits, float_logits, seconds)
                for index, fixed_logits, float_logits in zip(rows, fixed, reference)]

    return fill_reference_results(
        results, len(ids), batch, "window",
        lambda: DecoderReferenceRunner(checkpoint, engine, batch, ids.shape[1]), run_rows)


def _ref2k_record(index: int, window: np.ndarray, fixed: np.ndarray, reference: np.ndarray,
                  seconds: float) -> dict:
    fixed = fixed.astype(np.float64)[:-1]
    shifted = fixed - fixed.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(fixed)), window[1:]]
    return {
        "index": int(index),
        "nll_sum": float(nll.sum()),
        "predicted_tokens": int(nll.size),
        "max_logit_difference": float(np.abs(fixed - reference[:-1]).max()),
        "argmax_agreement": float(np.mean(fixed.argmax(-1) == reference[:-1].argmax(-1))),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------
# Agreement with a reference model.


def greedy_continuations(checkpoint: Checkpoint, prompts: np.ndarray,
                         new_tokens: int) -> np.ndarray:
    """Greedily continue every prompt [prompts, length] by ``new_tokens`` tokens, in float32.

    Each step reruns the whole window of prompt_len + new_tokens positions, and the positions
    not generated yet contain token 0. Causal attention keeps them from changing earlier
    positions, so the result equals ``models.llama.generate_greedy``. One compiled program
    serves every step and every prompt at once.
    """
    import jax
    import jax.numpy as jnp

    count, prompt_len = prompts.shape
    runner = WindowRunner(checkpoint.config, prompt_len + new_tokens)
    params = jax.tree_util.tree_map(jnp.asarray, checkpoint.params)
    ids = np.zeros((count, prompt_len + new_tokens), np.int32)
    ids[:, :prompt_len] = prompts
    for position in range(prompt_len - 1, prompt_len + new_tokens - 1):
        hidden = runner.hidden_states(params, checkpoint.plan, ids)
        logits = runner.logits(params, checkpoint.plan, hidden[:, position])
        ids[:, position + 1] = np.asarray(jnp.argmax(logits, axis=-1))
    return ids[:, prompt_len:]


def greedy_agreement(checkpoint: Checkpoint, reference: Checkpoint, prompts: np.ndarray,
                     new_tokens: int) -> dict:
    """Greedily continue each prompt with both models; compare the new tokens position by position.

    Returns the mean share of equal tokens over all prompts and, per prompt, the share and the
    first position (0-based) where the continuations differ (None where they never do).
    """
    started = time.perf_counter()
    ours = greedy_continuations(checkpoint, prompts, new_tokens)
    theirs = greedy_continuations(reference, prompts, new_tokens)
    rows = []
    for equal in ours == theirs:
        first_difference = None if equal.all() else int(np.argmin(equal))
        rows.append({"equal_fraction": float(equal.mean()), "first_difference": first_difference})
    return {
        "prompts": int(len(prompts)),
        "prompt_tokens": int(prompts.shape[1]),
        "new_tokens": new_tokens,
        "equal_fraction": float(np.mean(ours == theirs)),
        "per_prompt": rows,
        "seconds": time.perf_counter() - started,
    }


def prompt_windows(held_out: np.ndarray, count: int, prompt_len: int) -> np.ndarray:
    """Return ``count`` prompts of ``prompt_len`` tokens spread evenly over the held-out text."""
    if count < 1:
        return np.zeros((0, prompt_len), np.int32)
    chunks = windows(held_out, prompt_len)
    picks = np.linspace(0, len(chunks) - 1, min(count, len(chunks))).round().astype(int)
    return chunks[picks]


# ---------------------------------------------------------------------------------------------
# The whole measurement.


@dataclass(frozen=True)
class PerplexityConfig:
    """Inputs of one perplexity run; every output goes under ``work_dir``."""

    checkpoint: Path
    work_dir: Path
    # Model to compare with for agreement; None skips the comparison.
    reference: Path | None = None
    # Tokens per window.
    seq_len: int = DEFAULT_SEQ_LEN
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
    # Evaluate only the first N held-out windows in float32; None evaluates all.
    windows: int | None = None
    # Held-out windows (the first ones) to run under REF2K; 0 skips it.
    ref2k_windows: int = 4
    # Windows per REF2K run.
    ref2k_batch: int = 1
    # Greedy continuation: prompts spread over the held-out text, their length, new tokens.
    prompts: int = 4
    prompt_len: int = 32
    new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be at least 1 or None, got {self.windows}")
        for field in ("ref2k_windows", "prompts"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be 0 or more, got {getattr(self, field)}")
        for field in ("seq_len", "prompt_len"):
            if getattr(self, field) < 2:
                raise ValueError(f"{field} must be at least 2 tokens, got {getattr(self, field)}")
        for field in ("ref2k_batch", "new_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


def measure_perplexity(config: PerplexityConfig, split: TokenSplit | None = None) -> dict:
    """Run the float32, REF2K and agreement measurements; write and return the JSON report.

    ``split`` replaces the Hamlet split (tests pass token arrays of a tiny vocabulary). Raises
    CheckpointError for a missing or non-decoder checkpoint and WorkDirInUseError when another
    run uses ``config.work_dir``.
    """
    from cipherprompt.evaluate import WorkDirLock

    checkpoint = load_decoder_checkpoint(config.checkpoint)
    reference = load_decoder_checkpoint(config.reference) if config.reference else None
    config.work_dir.mkdir(parents=True, exist_ok=True)
    with WorkDirLock(config.work_dir / LOCK_NAME, run_name="perplexity"):
        if split is None:
            split = load_hamlet_split(config.held_out_fraction)
        return _measure_locked(config, checkpoint, reference, split)


def _measure_locked(config: PerplexityConfig, checkpoint: Checkpoint,
                    reference: Checkpoint | None, split: TokenSplit) -> dict:
    from cipherprompt.evaluate import ResultLog, setup_digest
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.files import write_json

    started = time.perf_counter()
    ids = windows(split.held_out, config.seq_len, config.windows)
    log.info("float32: %d held-out windows of %d tokens", len(ids), config.seq_len)
    float_figures = float_perplexity(checkpoint, ids)
    report = {
        "command": "cipherprompt perplexity",
        "config": {key: str(value) if isinstance(value, Path) else value
                   for key, value in dataclasses.asdict(config).items()},
        "checkpoint": _describe(config.checkpoint, checkpoint),
        "data": {**split.describe(), "seq_len": config.seq_len, "windows": int(len(ids))},
        "float32": _public(float_figures),
    }

    engine = dataclasses.replace(EngineConfig(), protocol="REF2K")
    ref2k_ids = ids[: config.ref2k_windows]
    if len(ref2k_ids):
        digest = hashlib.sha256(
            f"{setup_digest(checkpoint, engine)}:{config.seq_len}".encode()).hexdigest()
        results = ResultLog(config.work_dir / REF2K_RESULTS, digest,
                            [window_key(window) for window in ref2k_ids])
        import jax
        import jax.numpy as jnp

        runner = WindowRunner(checkpoint.config, config.seq_len)
        params = jax.tree_util.tree_map(jnp.asarray, checkpoint.params)

        def float_logits_of(rows):
            hidden = runner.hidden_states(params, checkpoint.plan, rows)
            return np.asarray(runner.logits(params, checkpoint.plan, hidden), np.float64)

        timing = run_reference(checkpoint, engine, ref2k_ids, float_logits_of, results,
                               config.ref2k_batch)
        report["ref2k"] = _ref2k_section(engine, results.records, len(ref2k_ids),
                                         float_figures["nll"][: len(ref2k_ids)], timing)

    if reference is not None:
        report["reference"] = _compare_with_reference(config, split, ids, float_figures,
                                                      checkpoint, reference)
    report["seconds"] = time.perf_counter() - started
    write_json(config.work_dir / REPORT_NAME, report)
    log.info("report written to %s", config.work_dir / REPORT_NAME)
    return report


def _describe(path: Path, checkpoint: Checkpoint) -> dict:
    return {
        "path": str(path),
        "name": checkpoint.metadata.get("name"),
        "plan": checkpoint.plan.name,
        "weights_sha256": checkpoint.weights_digest(),
    }


def _public(figures: dict) -> dict:
    """Drop the per-token arrays from a figures dict, leaving what goes into the report."""
    return {key: value for key, value in figures.items() if key not in ("nll", "predictions")}


def _ref2k_section(engine: EngineConfig, records: dict, count: int, float_nll: np.ndarray,
                   timing: dict) -> dict:
    done = [records[index] for index in range(count)]
    tokens = sum(record["predicted_tokens"] for record in done)
    mean_nll = sum(record["nll_sum"] for record in done) / tokens
    float_on_same = perplexity_of(float_nll)
    return {
        "engine": engine.to_dict(),
        "windows": count,
        "predicted_tokens": tokens,
        "perplexity": float(np.exp(mean_nll)),
        "float32_perplexity_same_windows": float_on_same,
        "relative_difference": float(np.exp(mean_nll) / float_on_same - 1.0),
        "max_logit_difference": max(record["max_logit_difference"] for record in done),
        "argmax_agreement_with_float32": float(np.mean([record["argmax_agreement"]
                                                        for record in done])),
        "seconds_per_window": float(np.mean([record["seconds"] for record in done])),
        **timing,
        "measured_in": "SPU REF2K in one process (plaintext fixed point, no cryptography)",
    }


def _compare_with_reference(config: PerplexityConfig, split: TokenSplit, ids: np.ndarray,
                            float_figures: dict, checkpoint: Checkpoint,
                            reference: Checkpoint) -> dict:
    log.info("reference %s: float32 perplexity and greedy continuations", config.reference)
    reference_figures = float_perplexity(reference, ids)
    section = {
        **_describe(config.reference, reference),
        "float32": _public(reference_figures),
        "perplexity_ratio": float_figures["perplexity"] / reference_figures["perplexity"],
        # Teacher forcing: both models see the same held-out text at every position.
        "next_token_agreement": float(np.mean(float_figures["predictions"]
                                              == reference_figures["predictions"])),
    }
    if config.prompts:
        prompts = prompt_windows(split.held_out, config.prompts, config.prompt_len)
        section["greedy"] = greedy_agreement(checkpoint, reference, prompts, config.new_tokens)
    return section


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``perplexity`` on the sub-command parsers of the cipherprompt CLI."""
    defaults = PerplexityConfig(Path("."), Path("."))
    parser = subparsers.add_parser(
        "perplexity",
        help="held-out perplexity of a decoder checkpoint in float32 and in SPU REF2K",
        description="Measure a decoder checkpoint's perplexity on the held-out end of Hamlet in "
                    "plaintext float32 and in SPU's REF2K fixed-point reference, and its "
                    "agreement with a reference decoder. Rerunning with the same --work-dir "
                    "skips finished REF2K windows.",
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="decoder checkpoint to measure (default: the exact decoder, "
                             "WORK_DIR/decoder/decoder-exact.npz, imported if missing)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="decoder to compare with (default: the exact decoder); "
                             "--no-reference skips the comparison")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the comparison with a reference decoder")
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work"),
                        help="folder for every output of the run; the report goes to "
                             "WORK_DIR/perplexity-PLAN/ (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="tokens per window (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=None,
                        help="evaluate only the first N held-out windows (default: all)")
    parser.add_argument("--ref2k-windows", type=int, default=defaults.ref2k_windows,
                        help="first held-out windows to run under REF2K; 0 skips it "
                             "(default: %(default)s)")
    parser.add_argument("--ref2k-batch", type=int, default=defaults.ref2k_batch,
                        help="windows per REF2K run (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts,
                        help="held-out prompts to continue greedily with both models; 0 skips "
                             "it (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len,
                        help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens,
                        help="tokens each model generates per prompt (default: %(default)s)")
    parser.set_defaults(handler=cmd_perplexity)
    return parser


def cmd_perplexity(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint or exact_checkpoint(args.work_dir)
    reference = None
    if not args.no_reference:
        reference = exact_checkpoint(args.work_dir, args.reference)
        if reference.resolve() == Path(checkpoint).resolve():
            log.info("the checkpoint is its own reference: skipping the comparison")
            reference = None
    plan_name = load_decoder_checkpoint(checkpoint).plan.name
    config = PerplexityConfig(
        checkpoint=checkpoint, work_dir=args.work_dir / f"perplexity-{plan_name}",
        reference=reference, seq_len=args.seq_len, windows=args.windows,
        ref2k_windows=args.ref2k_windows, ref2k_batch=args.ref2k_batch, prompts=args.prompts,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens,
    )
    print(format_summary(measure_perplexity(config)))
    return 0


def format_summary(report: dict) -> str:
    """Format the main figures as a few lines for the terminal (the report has them all)."""
    figures = report["float32"]
    lines = [f"{report['checkpoint']['plan']}: float32 perplexity {figures['perplexity']:.2f} on "
             f"{figures['windows']} held-out windows of {report['data']['seq_len']} tokens"]
    if "ref2k" in report:
        ref2k = report["ref2k"]
        lines.append(f"REF2K perplexity {ref2k['perplexity']:.2f} on the first "
                     f"{ref2k['windows']} windows (float32 there: "
                     f"{ref2k['float32_perplexity_same_windows']:.2f}, "
                     f"{ref2k['relative_difference']:+.2%})")
    if "reference" in report:
        reference = report["reference"]
        line = (f"reference {reference['plan']}: float32 perplexity "
                f"{reference['float32']['perplexity']:.2f}, ratio "
                f"{reference['perplexity_ratio']:.3f}; next-token agreement "
                f"{reference['next_token_agreement']:.2%}")
        if "greedy" in reference:
            line += (f"; greedy continuations equal for "
                     f"{reference['greedy']['equal_fraction']:.2%} of tokens")
        lines.append(line)
    return "\n".join(lines)
