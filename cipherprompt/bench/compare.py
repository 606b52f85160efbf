"""``cipherprompt bench``: operator plans of one model side by side, on the same inputs and link.

Each plan runs as one two-party session (``runner.py``): a server process that owns the weights
and a client process that owns the inputs, each in its own network namespace on an emulated link
(``network.py``). The report gives per plan the seconds per query, bytes each way and messages
from the client's SPU profile, the ratios of every friendly plan to ``exact`` and ``reference``,
and the accuracy read from ``cipherprompt evaluate`` reports. Figures that were not measured
are reported as such, never filled in.

Seconds, bytes and messages per query are the mean over the queries after the first: the first
query of a session also pays SPU's OT and HE key set-up. With one query, it is that query's.

A model larger than the machine can run whole is run for its first layers only, and the report
extrapolates to all layers: the layers have equal shapes, so each costs the same.

jax and SPU are imported inside the functions that use them, so the CLI's parser stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cipherprompt.bench.estimate import NETWORK_PRESETS, Network
from cipherprompt.files import write_json, write_text_atomically
from cipherprompt.bench.machine import machine_facts

log = logging.getLogger(__name__)

DEFAULT_TEXTS = (
    "more precious than perspicacious",
    "Director Nolan shows here he can handle clever material with flair",
)
RESULTS_DIR = Path("benchmarks") / "results"
# Baselines every friendly plan is compared with, and how the report names them.
BASELINES = {
    "exact": "exact (GELU in its tanh form, softmax, LayerNorm)",
    "reference": "reference (the original operators: erf GELU, softmax, LayerNorm)",
}
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class ModelPreset:
    """An architecture and the stages a bench run of it runs by default."""

    config: dict
    max_len: int
    # None runs every layer; a number runs the first layers and extrapolates.
    run_layers: int | None
    embedding: bool
    head: bool


MODEL_PRESETS = {
    # all-MiniLM-L6-v2's shape (BertConfig's defaults); normally run from checkpoints.
    "minilm": ModelPreset({}, max_len=32, run_layers=None, embedding=True, head=True),
    # BERT-base: one layer at 128 tokens with random weights, extrapolated to 12 layers.
    "bert-base": ModelPreset({"hidden_size": 768, "num_layers": 12, "num_heads": 12,
                              "intermediate_size": 3072}, max_len=128, run_layers=1,
                             embedding=False, head=False),
}


@dataclass(frozen=True)
class BenchConfig:
    """Inputs of one bench run; outputs go to ``out`` and ``work_dir``."""

    model: str = "minilm"
    # BertConfig fields that replace the preset's, e.g. {"hidden_size": 64} for a small trial.
    config_overrides: dict = field(default_factory=dict)
    plans: tuple[str, ...] = ("exact", "friendly")
    # Checkpoint per plan; without any, every plan uses random weights of ``seed``.
    checkpoints: dict = field(default_factory=dict)
    # evaluate-report.json per plan.
    accuracy_reports: dict = field(default_factory=dict)
    # None takes the checkpoint's serving length, or the preset's.
    max_len: int | None = None
    # None takes the preset's choice; see ModelPreset.
    run_layers: int | None = None
    embedding: bool | None = None
    head: bool | None = None
    queries: int = 2
    texts: tuple[str, ...] = DEFAULT_TEXTS
    network: Network = NETWORK_PRESETS["loopback"]
    # False skips network namespaces: the relay on 127.0.0.1 emulates the link instead.
    use_namespaces: bool = True
    # Route the parties through the relay even with no added latency (to measure the relay).
    force_relay: bool = False
    # Measure the emulated link's round-trip time and throughput before the sessions.
    probe: bool = True
    out: Path | None = None
    work_dir: Path = Path("cipherprompt-work") / "bench"
    link_timeout_s: float = 1800.0
    # Seconds one plan's session may take in all, set-up and every query included.
    session_timeout_s: float = 4 * 3600.0
    seed: int = 0
    command: str = ""
    # SPU settings as EngineConfig fields, or None for today's defaults. --reproduce sets the
    # record's, so that a record made under other defaults moves the same bytes again.
    engine: dict | None = None

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}; valid choices: "
                             f"{', '.join(MODEL_PRESETS)}")
        if not self.plans:
            raise ValueError("no plans to run; pass --plans, e.g. exact,friendly")
        if len(set(self.plans)) != len(self.plans):
            raise ValueError(f"--plans lists a plan twice: {', '.join(self.plans)}")
        for name, mapping in (("--checkpoint", self.checkpoints),
                              ("--accuracy", self.accuracy_reports)):
            unknown = sorted(set(mapping) - set(self.plans))
            if unknown:
                raise ValueError(f"{name} names plans that --plans does not run: "
                                 f"{', '.join(unknown)}")
        if self.queries < 1:
            raise ValueError(f"queries must be at least 1, got {self.queries}")
        if not self.texts:
            raise ValueError("no input texts; pass --text")
        if self.max_len is not None and self.max_len < 3:
            raise ValueError(f"max_len must be at least 3 tokens, got {self.max_len}")
        if self.run_layers is not None and self.run_layers < 1:
            raise ValueError(f"run_layers must be at least 1, got {self.run_layers}")


@dataclass
class PlanSetup:
    """Session of one plan: its model spec and the source of its weights."""

    name: str
    model: object  # party.ModelSpec
    weights: dict
    checkpoint_sha256: str | None = None


# -- preparing the sessions ------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Architecture and stages shared by every plan of a run."""

    config: dict
    run_layers: int
    max_len: int
    embedding: bool
    head: bool


def _resolve_shape(config: BenchConfig, checkpoints: dict) -> _Shape:
    """Take the architecture from the checkpoints, or from the preset and --config."""
    from cipherprompt.models.bert import BertConfig

    preset = MODEL_PRESETS[config.model]
    if checkpoints:
        architectures = {json.dumps(ckpt.config.to_dict(), sort_keys=True)
                         for ckpt in checkpoints.values()}
        if len(architectures) > 1:
            raise ValueError("the checkpoints have different architectures; bench compares plans "
                             "of one model")
        if config.config_overrides:
            raise ValueError("--config changes the architecture, which checkpoints fix; drop it")
        model_config = next(iter(checkpoints.values())).config.to_dict()
    else:
        model_config = BertConfig(**{**preset.config, **config.config_overrides}).to_dict()

    num_layers = model_config["num_layers"]
    run_layers = config.run_layers or preset.run_layers or num_layers
    if run_layers > num_layers:
        raise ValueError(f"--run-layers {run_layers} exceeds the model's {num_layers} layers")
    max_len = config.max_len or (next(iter(checkpoints.values())).max_len if checkpoints
                                 else preset.max_len)
    if max_len > model_config["max_positions"]:
        raise ValueError(f"--max-len {max_len} exceeds the model's "
                         f"{model_config['max_positions']} positions; pass a smaller --max-len")
    return _Shape(model_config, run_layers, max_len,
                  preset.embedding if config.embedding is None else config.embedding,
                  preset.head if config.head is None else config.head)


def _plan_setup(plan_name: str, shape: _Shape, config: BenchConfig,
                checkpoints: dict) -> PlanSetup:
    """Return one plan's model spec: its operators with checkpoint or random weights."""
    from cipherprompt.bench.party import ModelSpec
    from cipherprompt.plan import OperatorPlan

    num_layers = shape.config["num_layers"]
    stages = (shape.run_layers, shape.embedding, shape.head)
    checkpoint_plan = plan_name
    if plan_name not in checkpoints and plan_name == "reference" and "exact" in checkpoints:
        checkpoint_plan = "exact"  # the teacher's weights under the original operators
    if not checkpoints:
        plan = OperatorPlan.preset(plan_name, num_layers)
        spec = ModelSpec(shape.config, plan.to_dict(), *stages, weights_seed=config.seed)
        return PlanSetup(plan_name, spec, {"source": "random", "init_params_seed": config.seed})
    if checkpoint_plan not in checkpoints:
        raise ValueError(f"plan {plan_name!r} has no checkpoint; pass --checkpoint "
                         f"{plan_name}=PATH (reference may reuse the exact checkpoint)")

    checkpoint = checkpoints[checkpoint_plan]
    path = config.checkpoints[checkpoint_plan]
    if checkpoint.plan.name != checkpoint_plan:
        raise ValueError(f"checkpoint {path} was trained with plan {checkpoint.plan.name!r}, "
                         f"not {checkpoint_plan!r}; pass it as --checkpoint "
                         f"{checkpoint.plan.name}={path}")
    plan = (checkpoint.plan if checkpoint_plan == plan_name
            else OperatorPlan.preset(plan_name, num_layers))
    weights = {"source": "checkpoint", "path": str(path), "sha256": checkpoint.weights_digest(),
               "trained_plan": checkpoint_plan, "name": checkpoint.metadata.get("name")}
    spec = ModelSpec(shape.config, plan.to_dict(), *stages,
                     checkpoint=str(Path(path).resolve()))
    return PlanSetup(plan_name, spec, weights, weights["sha256"])


def _plan_setups(config: BenchConfig) -> tuple[list[PlanSetup], dict, int]:
    """Resolve every plan's architecture, operators and weights; return them, config, max_len."""
    from cipherprompt.checkpoint import load_checkpoint

    checkpoints = {plan: load_checkpoint(Path(path)) for plan, path in config.checkpoints.items()}
    shape = _resolve_shape(config, checkpoints)
    setups = [_plan_setup(name, shape, config, checkpoints) for name in config.plans]
    return setups, shape.config, shape.max_len


def _write_inputs(config: BenchConfig, model_config: dict, max_len: int, path: Path) -> dict:
    """Write the client's token ids and masks (one row per query); describe them."""
    from cipherprompt.assets import AssetError
    from cipherprompt.tokenizer import WordPieceTokenizer

    texts = [config.texts[index % len(config.texts)] for index in range(config.queries)]
    reason = "the model's vocabulary is not the tokenizer's"
    try:
        tokenizer = WordPieceTokenizer()
        usable = tokenizer.vocab_size == model_config["vocab_size"]
    except AssetError as error:
        reason, usable = f"the tokenizer is unavailable: {error}", False
    if usable:
        ids, mask = tokenizer.encode_batch(texts, max_len, True)
        description = {"kind": "texts", "texts": texts, "truncated_to": max_len}
    else:
        # SPU's cost does not depend on the values, so random ids cost what real ones do.
        rng = np.random.default_rng(config.seed)
        ids = rng.integers(0, model_config["vocab_size"], (config.queries, max_len))
        mask = np.ones((config.queries, max_len), np.int32)
        description = {"kind": f"random token ids of seed {config.seed}", "reason": reason}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=np.asarray(ids, np.int32), mask=np.asarray(mask, np.int32))
    return description


# -- reading the results ---------------------------------------------------------------------


def _query_figures(query: dict) -> dict:
    return {"seconds": query["wall_seconds"], "spu_seconds": query["seconds"],
            "bytes_client_to_server": query["bytes_sent"],
            "bytes_server_to_client": query["bytes_received"], "messages": query["messages"]}


def _mean(rows: list[dict]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def summarise_queries(queries: list[dict]) -> dict:
    """Return the per-query figures: the mean after the first query, and the first on its own."""
    figures = [_query_figures(query) for query in queries]
    counted = figures[1:] if len(figures) > 1 else figures
    summary = _mean(counted)
    summary["queries_counted"] = len(counted)
    summary["first_query"] = figures[0]
    stage_names = [stage["stage"] for stage in queries[0]["stages"]]
    counted_queries = queries[1:] if len(queries) > 1 else queries
    summary["stages"] = [
        {"stage": name, **_mean([{
            "spu_seconds": query["stages"][index]["seconds"],
            "bytes_client_to_server": query["stages"][index]["bytes_sent"],
            "bytes_server_to_client": query["stages"][index]["bytes_received"],
            "messages": (query["stages"][index]["messages_sent"]
                         + query["stages"][index]["messages_received"]),
        } for query in counted_queries])}
        for index, name in enumerate(stage_names)
    ]
    return summary


def extrapolate(summary: dict, num_layers: int) -> dict:
    """Project the stages that ran to all ``num_layers`` layers: each layer costs the mean layer."""
    layers = [stage for stage in summary["stages"] if stage["stage"].startswith("layer")]
    others = [stage for stage in summary["stages"] if not stage["stage"].startswith("layer")]
    projected = {}
    for key in ("spu_seconds", "bytes_client_to_server", "bytes_server_to_client", "messages"):
        layer_mean = float(np.mean([stage[key] for stage in layers]))
        projected[key] = num_layers * layer_mean + sum(stage[key] for stage in others)
    projected["layers"] = num_layers
    projected["included_stages"] = [stage["stage"] for stage in others] + [
        f"{num_layers} x mean of {', '.join(stage['stage'] for stage in layers)}"]
    return projected


def ratios(plans: dict[str, dict], key: str = "per_query") -> list[dict]:
    """Return plan / baseline ratios of time, bytes and messages for every pair that ran.

    Every plan other than the baselines (``exact``, ``reference``) is compared with each
    baseline that ran: ``friendly``, ``friendly-first-K`` and ablations like
    ``exact+activation=relu``.
    """
    rows = []
    for numerator in plans:
        if numerator in BASELINES:
            continue
        for baseline, label in BASELINES.items():
            if baseline not in plans or plans[baseline].get(key) is None:
                continue
            top, bottom = plans[numerator][key], plans[baseline][key]
            seconds_key = "seconds" if "seconds" in top else "spu_seconds"
            top_bytes = top["bytes_client_to_server"] + top["bytes_server_to_client"]
            bottom_bytes = bottom["bytes_client_to_server"] + bottom["bytes_server_to_client"]
            rows.append({
                "numerator": numerator,
                "denominator": baseline,
                "denominator_label": label,
                "time": top[seconds_key] / bottom[seconds_key],
                "communication": top_bytes / bottom_bytes,
                "messages": top["messages"] / bottom["messages"],
            })
    return rows


def read_accuracy(path: Path, plan: str, setup: PlanSetup) -> dict:
    """Read an ``evaluate-report.json``; raise ValueError when it is for another checkpoint."""
    try:
        report = json.loads(Path(path).read_text())
        checkpoint = report["checkpoint"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--accuracy {plan}={path}: not a readable evaluate report ({error})"
                         ) from None
    if setup.checkpoint_sha256 is None:
        raise ValueError(f"--accuracy {plan}={path}: plan {plan} runs random weights, so no "
                         "accuracy applies; pass --checkpoint too")
    if checkpoint.get("weights_sha256") != setup.checkpoint_sha256 or (
            checkpoint.get("plan") != setup.model.plan["name"]):
        raise ValueError(
            f"--accuracy {plan}={path} is for checkpoint {checkpoint.get('path')} (plan "
            f"{checkpoint.get('plan')}, weights {str(checkpoint.get('weights_sha256'))[:12]}), "
            f"not for the weights this run uses for plan {plan} "
            f"({setup.checkpoint_sha256[:12]}, plan {setup.model.plan['name']})")
    cheetah = report.get("cheetah", {})
    return {
        "report": str(path),
        "sentences": report.get("data", {}).get("sentences"),
        "float": report.get("float_serve_len", {}).get("accuracy"),
        "ref2k": report.get("ref2k", {}).get("accuracy"),
        "cheetah": cheetah.get("accuracy"),
        "cheetah_sentences": cheetah.get("completed", 0),
        "max_len": checkpoint.get("max_len"),
    }


def plaintext_max_error(setup: PlanSetup, max_len: int, inputs: Path, outputs: Path) -> dict:
    """Compare the client's reconstructed outputs with the plaintext run of the same stages."""
    import jax.numpy as jnp

    from cipherprompt.bench.party import hidden_part, load_weights, truncated
    from cipherprompt.bench.runner import HIDDEN_SEEDS
    from cipherprompt.models.bert import classifier_head, embed, encoder_layer, pooling_weights
    from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK

    config, plan = truncated(setup.model)
    params = load_weights(setup.model)
    data = np.load(inputs)
    private = np.load(outputs)
    errors, scale = [], 0.0
    for query in range(private.shape[0]):
        mask = data["mask"][query][None, :].astype(np.float32)
        if setup.model.embedding:
            x = embed(params, config, plan, jnp.asarray(data["ids"][query][None, :]))
        else:
            x = (hidden_part(HIDDEN_SEEDS[SERVER_RANK], query, max_len, config.hidden_size)
                 + hidden_part(HIDDEN_SEEDS[CLIENT_RANK], query, max_len, config.hidden_size))
        for layer_params, layer_plan in zip(params["layers"], plan.layers):
            x = encoder_layer(layer_params, config, layer_plan, x, mask)[0]
        if setup.model.head:
            x = classifier_head(params, x, pooling_weights(mask))
        expected = np.asarray(x)[0]
        errors.append(float(np.abs(private[query] - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return {"max_abs_error": max(errors), "max_abs_plaintext_value": scale,
            "output": "logits" if setup.model.head else "hidden states"}


# -- machine and report ----------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"


def _format_bytes(count: float) -> str:
    from cipherprompt.secure.cost import format_bytes

    return format_bytes(count)


def _format_accuracy(accuracy: dict | None) -> str:
    if not accuracy:
        return NOT_MEASURED
    parts = []
    if accuracy.get("cheetah") is not None:
        parts.append(f"CHEETAH {accuracy['cheetah']:.4f} ({accuracy['cheetah_sentences']} "
                     "sentences)")
    if accuracy.get("ref2k") is not None:
        parts.append(f"REF2K {accuracy['ref2k']:.4f} ({accuracy['sentences']} sentences)")
    if accuracy.get("float") is not None:
        parts.append(f"float32 {accuracy['float']:.4f}")
    return "; ".join(parts) or NOT_MEASURED


def _describe_ratio(row: dict) -> tuple[str, str, str]:
    time_ratio, bytes_ratio = row["time"], row["communication"]
    time_text = (f"{time_ratio:.2f} ({1 / time_ratio:.2f}x faster)" if time_ratio < 1
                 else f"{time_ratio:.2f} ({time_ratio:.2f}x slower)")
    bytes_text = (f"{bytes_ratio:.2f} ({100 * (1 - bytes_ratio):.0f}% less)" if bytes_ratio <= 1
                  else f"{bytes_ratio:.2f} ({100 * (bytes_ratio - 1):.0f}% more)")
    return time_text, bytes_text, f"{row['messages']:.2f}"


def _describe_network(network: dict) -> str:
    bandwidth = network["bandwidth_bit_s"]
    wanted = "no added latency or bandwidth limit" if bandwidth is None and not network[
        "rtt_s"] else (f"{'unlimited' if bandwidth is None else _bit_rate(bandwidth)}, "
                       f"RTT {network['rtt_s'] * 1000:g} ms")
    how = {"loopback": "both parties on 127.0.0.1",
           "namespaces": "separate network namespaces joined by a veth pair"
                         + (", tbf on both ends" if network["tbf"] else "")
                         + (", delay relay" if network["relay"] else ""),
           }.get(network["emulation"], "delay relay on 127.0.0.1"
                 + (" pacing the bandwidth in user space" if network["relay"]
                    and network["relay"]["paced_rate_bit_s"] else ""))
    text = f"{network['preset']} ({wanted}); {how}"
    if network["fallback_reason"]:
        text += f". No namespaces: {network['fallback_reason']}"
    probe = network.get("measured")
    if probe:
        text += (f". Measured: RTT {probe['rtt_s'] * 1000:.2f} ms, "
                 f"{_bit_rate(probe['client_to_server_bit_s'])} client to server, "
                 f"{_bit_rate(probe['server_to_client_bit_s'])} server to client")
    return text


def _bit_rate(bit_s: float) -> str:
    return f"{bit_s / 1e9:.2f} Gbit/s" if bit_s >= 1e9 else f"{bit_s / 1e6:.0f} Mbit/s"


def _setting_lines(record: dict) -> list[str]:
    model, machine, load = record["model"], record["machine"], record["load_average"]
    config = model["config"]
    lines = [
        f"# cipherprompt bench: {model['name']}, {record['max_len']} tokens",
        "",
        (f"- Model: hidden {config['hidden_size']}, {config['num_heads']} heads, FFN "
         f"{config['intermediate_size']}, {config['num_layers']} layers; stages run: "
         f"{', '.join(model['stages'])}"),
        f"- Network: {_describe_network(record['network'])}",
        (f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
         f"load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"),
        (f"- Queries per plan: {record['queries']}; figures are per query, the mean after the "
         "first (which also pays OT and HE key set-up). Bytes and messages are SPU's profile "
         "on the client."),
    ]
    if not record.get("complete", True):
        lines.append(f"- Incomplete: only the plans below finished. {record['failure']}"
                     .splitlines()[0])
    return lines


def _plan_lines(record: dict) -> list[str]:
    lines = [
        "",
        ("| plan | seconds | client to server | server to client | messages | first query "
         "seconds | session set-up seconds | peak memory server / client | accuracy |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, plan in record["plans"].items():
        figures, memory = plan["per_query"], plan["peak_rss_bytes"]
        lines.append(
            f"| {name} | {_format_seconds(figures['seconds'])} | "
            f"{_format_bytes(figures['bytes_client_to_server'])} | "
            f"{_format_bytes(figures['bytes_server_to_client'])} | {figures['messages']:,.0f} | "
            f"{_format_seconds(figures['first_query']['seconds'])} | "
            f"{_format_seconds(plan['setup_seconds'])} | "
            f"{_format_bytes(memory['server'])} / {_format_bytes(memory['client'])} | "
            f"{_format_accuracy(plan['accuracy'])} |")
    return lines


def _ratio_lines(record: dict) -> list[str]:
    if not record["ratios"]:
        return []
    lines = ["", "| ratio | time | communication (both ways) | messages |",
             "| --- | --- | --- | --- |"]
    for row in record["ratios"]:
        time_text, bytes_text, messages = _describe_ratio(row)
        lines.append(f"| {row['numerator']} / {row['denominator_label']} | {time_text} | "
                     f"{bytes_text} | {messages} |")
    return lines


def _extrapolation_lines(record: dict) -> list[str]:
    extra = record.get("extrapolation")
    if not extra:
        return []
    lines = ["", f"Estimate for all {extra['layers']} layers, not measured: {extra['rule']}.", "",
             "| plan | seconds | client to server | server to client | messages |",
             "| --- | --- | --- | --- | --- |"]
    for name, plan in record["plans"].items():
        projected = plan["extrapolated"]
        lines.append(f"| {name} | {_format_seconds(projected['spu_seconds'])} | "
                     f"{_format_bytes(projected['bytes_client_to_server'])} | "
                     f"{_format_bytes(projected['bytes_server_to_client'])} | "
                     f"{projected['messages']:,.0f} |")
    return lines


def _check_lines(record: dict) -> list[str]:
    checked = {name: plan["output_check"] for name, plan in record["plans"].items()
               if plan.get("output_check")}
    if not checked:
        return []
    parts = [f"{name}: {check['max_abs_error']:.2e} (largest plaintext value "
             f"{check['max_abs_plaintext_value']:.2f})" for name, check in checked.items()]
    output = next(iter(checked.values()))["output"]
    return ["", (f"Private {output} against plaintext float32 of the same weights, max abs "
                 f"difference: {'; '.join(parts)}.")]


def format_report(record: dict) -> str:
    """Format the record as Markdown: setting, one row per plan, ratios, extrapolation."""
    lines = (_setting_lines(record) + _plan_lines(record) + _ratio_lines(record)
             + _extrapolation_lines(record) + _check_lines(record))
    return "\n".join(lines) + "\n"


# -- the run ---------------------------------------------------------------------------------


def default_out(config: BenchConfig, max_len: int) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"bench-{config.model}-{config.network.name}-{max_len}-{stamp}.json"


def run_bench(config: BenchConfig) -> dict:
    """Run every plan's session on the emulated network; write and return the record.

    When a plan's session fails, the plans that finished before it are written with
    ``complete`` false and the failure, and the SessionError is raised again. Nothing is
    written when no plan finished, or when the run was interrupted.
    """
    from cipherprompt.bench.runner import SessionError
    from cipherprompt.secure.engine import EngineConfig

    started = time.time()
    setups, model_config, max_len = _plan_setups(config)
    accuracy = {plan: read_accuracy(path, plan, next(s for s in setups if s.name == plan))
                for plan, path in config.accuracy_reports.items()}
    out = config.out or default_out(config, max_len)
    work_dir = config.work_dir / f"run-{os.getpid()}"
    inputs_path = work_dir / "inputs.npz"
    context = {
        "command": config.command,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "max_len": max_len,
        "queries": config.queries,
        "inputs": _write_inputs(config, model_config, max_len, inputs_path),
        "engine": config.engine or EngineConfig().to_dict(),
        "machine": machine_facts(),
    }
    load_start = list(os.getloadavg())

    sessions: dict[str, dict] = {}
    context["network"] = {}
    failure = None
    try:
        _run_sessions(config, setups, max_len, context["engine"], inputs_path, work_dir,
                      sessions, context["network"])
    except SessionError as error:
        failure = error
        if not sessions:
            raise
    # The plaintext checks run after the sessions, so the parties had the memory to themselves.
    context["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    plans = {setup.name: _plan_record(setup, sessions[setup.name], accuracy.get(setup.name),
                                      max_len, inputs_path, model_config)
             for setup in setups if setup.name in sessions}
    record = _build_record(config, context, plans, model_config, setups[0])
    record["seconds"] = time.time() - started
    record["complete"] = failure is None
    if failure is not None:
        record["failure"] = str(failure)
    write_json(out, record)
    write_text_atomically(out.with_suffix(".md"), format_report(record))
    if failure is not None:
        raise SessionError(f"{failure}\nthe plans that finished are recorded in {out}")
    record["out"] = str(out)
    return record


def _run_sessions(config: BenchConfig, setups: list[PlanSetup], max_len: int, engine: dict,
                  inputs_path: Path, work_dir: Path, sessions: dict, network_record: dict) -> None:
    """Run each plan's session in turn, filling ``sessions`` and ``network_record``.

    Raises SessionError from the first plan that fails, with the earlier plans in ``sessions``.
    """
    from cipherprompt.bench.network import EmulatedNetwork
    from cipherprompt.bench.runner import probe_link, run_session

    with EmulatedNetwork(config.network, work_dir, config.use_namespaces,
                         config.force_relay) as network:
        network_record.update(network.describe())
        if config.probe:
            log.info("measuring the emulated link")
            network_record["measured"] = probe_link(network, work_dir / "probe")
        for slot, setup in enumerate(setups, start=1):
            log.info("plan %s: %d queries of %d tokens (%d/%d)", setup.name, config.queries,
                     max_len, slot, len(setups))
            sessions[setup.name] = run_session(
                network, slot, setup.model, max_len, engine, config.queries, inputs_path,
                work_dir / setup.name, config.link_timeout_s, config.session_timeout_s)
            figures = summarise_queries(sessions[setup.name]["client"]["queries"])
            log.info("plan %s: %.1f s and %s per query", setup.name, figures["seconds"],
                     _format_bytes(figures["bytes_client_to_server"]
                                   + figures["bytes_server_to_client"]))


def _build_record(config: BenchConfig, context: dict, plans: dict, model_config: dict,
                  first: PlanSetup) -> dict:
    """Assemble the JSON record from the run's context and the plans that finished."""
    from cipherprompt.bench.party import truncated

    run_config, _ = truncated(first.model)
    stage_names = next(iter(plans.values()))["stages_run"]
    record = {
        **context,
        "model": {
            "name": config.model + (" (changed by --config)" if config.config_overrides else ""),
            "config": model_config,
            "run_layers": run_config.num_layers,
            "stages": stage_names,
        },
        "plans": plans,
        "ratios": ratios(plans),
    }
    if run_config.num_layers < model_config["num_layers"]:
        others = [name for name in stage_names if not name.startswith("layer")]
        record["extrapolation"] = {
            "layers": model_config["num_layers"],
            "rule": (f"{model_config['num_layers']} x the measured layer's SPU seconds, bytes "
                     f"and messages, plus the other stages run ({', '.join(others) or 'none'})"
                     + ("" if "embedding" in stage_names else "; the embedding is not included")
                     + ("" if "head" in stage_names else "; the head is not included")),
        }
        record["extrapolated_ratios"] = ratios(plans, "extrapolated")
    return record


def _plan_record(setup: PlanSetup, records: dict, accuracy: dict | None, max_len: int,
                 inputs_path: Path, model_config: dict) -> dict:
    client, server = records["client"], records["server"]
    if client["program_sha256"] != server["program_sha256"]:
        raise RuntimeError(f"plan {setup.name}: the parties ran different programs")
    per_query = summarise_queries(client["queries"])
    record = {
        "operators": setup.model.plan,
        "weights": setup.weights,
        "program_sha256": client["program_sha256"],
        "stages_run": client["stages"],
        "per_query": per_query,
        "server_per_query": summarise_queries(server["queries"]),
        "setup_seconds": max(client["setup_seconds"], server["setup_seconds"]),
        "compile_seconds": {"server": server["compile_seconds"],
                            "client": client["compile_seconds"]},
        "peak_rss_bytes": {"server": (server["peak_rss_kib"] or 0) * 1024,
                           "client": (client["peak_rss_kib"] or 0) * 1024},
        "accuracy": accuracy,
        "client_queries": client["queries"],
        "relay": records.get("relay"),
        "output_check": plaintext_max_error(setup, max_len, inputs_path,
                                            Path(client["outputs"])),
    }
    if setup.model.run_layers < model_config["num_layers"]:
        record["extrapolated"] = extrapolate(per_query, model_config["num_layers"])
    return record


# -- command line ----------------------------------------------------------------------------


def _plan_paths(values: list[str] | None, option: str) -> dict[str, Path]:
    mapping = {}
    for value in values or ():
        # The last "=" splits, because plan names such as exact+activation=relu contain one.
        plan, separator, path = value.rpartition("=")
        if not separator or not plan or not path:
            raise ValueError(f"invalid {option} {value!r}; expected PLAN=PATH, e.g. "
                             "exact=cipherprompt-work/teacher/teacher.npz")
        if plan in mapping:
            raise ValueError(f"{option} names plan {plan!r} twice")
        mapping[plan] = Path(path)
    return mapping


def network_from_args(args) -> Network:
    """Return the preset network, or a custom one when --bandwidth or --rtt is given."""
    if args.bandwidth is None and args.rtt is None:
        if args.network == "custom":
            raise ValueError("--network custom needs --bandwidth MBIT_S, --rtt MS or both")
        return NETWORK_PRESETS[args.network or "loopback"]
    if args.network not in ("custom", None):
        raise ValueError(f"--bandwidth and --rtt define a custom network; drop --network "
                         f"{args.network} or pass --network custom")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise ValueError(f"--bandwidth must be positive, got {args.bandwidth} Mbit/s")
    if args.rtt is not None and not args.rtt >= 0:
        raise ValueError(f"--rtt must not be negative, got {args.rtt} ms")
    return Network("custom", math.inf if args.bandwidth is None else args.bandwidth * 1e6,
                   (args.rtt or 0.0) / 1000)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the sub-command parsers of the cipherprompt CLI."""
    parser = subparsers.add_parser(
        "bench",
        help="operator plans side by side: seconds, bytes and messages per query on a network",
        description="Run each operator plan of one model as a two-party session (server and "
                    "client in separate processes and network namespaces, on an emulated "
                    "link) on the same inputs, and report the plans side by side with the "
                    "ratios friendly / exact and friendly / reference. Writes a JSON record "
                    "and a Markdown table.",
    )

    # What runs: the model, its plans and weights, and the stages.
    parser.add_argument("--model", default="minilm", choices=list(MODEL_PRESETS),
                        help="architecture: minilm (6 layers, hidden 384; use --checkpoint) or "
                             "bert-base (12 layers, hidden 768, random weights, one layer run "
                             "at 128 tokens and extrapolated) (default: %(default)s)")
    parser.add_argument("--config", default=None,
                        help="JSON object of BertConfig fields replacing the preset's, e.g. "
                             "'{\"hidden_size\": 64, \"num_heads\": 4, \"intermediate_size\": "
                             "256, \"num_layers\": 1}' for a small trial")
    parser.add_argument("--plans", default="exact,friendly",
                        help="comma-separated operator plans to run, e.g. "
                             "exact,friendly,reference (default: %(default)s)")
    parser.add_argument("--checkpoint", action="append", metavar="PLAN=PATH",
                        help="weights for a plan, e.g. exact=teacher.npz friendly=student.npz; "
                             "may be repeated; reference reuses the exact checkpoint; without "
                             "any, all plans use random weights")
    parser.add_argument("--accuracy", action="append", metavar="PLAN=PATH",
                        help="evaluate-report.json of the plan's checkpoint; may be repeated; "
                             f"plans without one show '{NOT_MEASURED}'")
    parser.add_argument("--max-len", type=int, default=None,
                        help="sequence length in tokens (default: the checkpoint's, else 32 for "
                             "minilm and 128 for bert-base)")
    parser.add_argument("--run-layers", type=int, default=None,
                        help="run only the first N layers and extrapolate to all (default: all "
                             "for minilm, 1 for bert-base)")
    parser.add_argument("--embedding", action=argparse.BooleanOptionalAction, default=None,
                        help="run the embedding lookup; without it the first layer gets a "
                             "random secret-shared input (default: on for minilm, off for "
                             "bert-base)")
    parser.add_argument("--head", action=argparse.BooleanOptionalAction, default=None,
                        help="run the classifier head (default: on for minilm, off for "
                             "bert-base)")

    # The inputs.
    parser.add_argument("--queries", type=int, default=2,
                        help="queries per plan in one session; the first also pays key set-up "
                             "and is reported apart (default: %(default)s)")
    parser.add_argument("--text", action="append", default=None,
                        help="input text, may be repeated; queries cycle through them "
                             "(default: two built-in sentences)")

    # The network between the parties.
    parser.add_argument("--network", default=None, choices=[*NETWORK_PRESETS, "custom"],
                        help="loopback (no emulation), lan (3 Gbit/s, 1 ms RTT) or wan "
                             "(100 Mbit/s, 40 ms RTT) (default: loopback)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="custom network: bandwidth each way in Mbit/s (default: no limit)")
    parser.add_argument("--rtt", type=float, default=None,
                        help="custom network: round-trip time in milliseconds (default: 0)")
    parser.add_argument("--no-namespaces", action="store_true",
                        help="do not create network namespaces; emulate the link with the relay "
                             "on 127.0.0.1 (also the automatic fallback without root)")
    parser.add_argument("--via-relay", action="store_true",
                        help="route through the delay relay even when it adds no delay, to "
                             "measure the relay's own overhead")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip measuring the emulated link's round-trip time and throughput")

    # Outputs and limits.
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON record to write (default: {RESULTS_DIR}/bench-MODEL-NETWORK-"
                             "LEN-TIME.json); the Markdown table goes beside it as .md")
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work") / "bench",
                        help="folder for the parties' logs and SPU profiles "
                             "(default: %(default)s)")
    parser.add_argument("--link-timeout", type=float, default=1800.0,
                        help="seconds one protocol step may wait for the peer "
                             "(default: %(default)s)")
    parser.add_argument("--session-timeout", type=float, default=4 * 3600.0,
                        help="seconds one plan's session may take in all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random weights and random token ids (default: 0)")

    # Reproducing a record.
    parser.add_argument("--reproduce", type=Path, default=None, metavar="RECORD",
                        help="run the command of a bench record (e.g. benchmarks/results/"
                             "small-h128-l1-32-wan.json) again under its engine settings and "
                             "compare: exit status 1 when bytes or messages per query differ "
                             "by more than --tolerance; takes what runs from the record")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="with --reproduce: largest relative difference of bytes and "
                             "messages per query that counts as reproduced (default: "
                             "%(default)s)")
    parser.set_defaults(handler=cmd_bench, bench_parser=parser)
    return parser


def config_from_args(args) -> BenchConfig:
    overrides = {}
    if args.config is not None:
        try:
            overrides = json.loads(args.config)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config is not valid JSON: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config must be a JSON object, got {args.config!r}")
    return BenchConfig(
        model=args.model,
        config_overrides=overrides,
        plans=tuple(plan.strip() for plan in args.plans.split(",") if plan.strip()),
        checkpoints=_plan_paths(args.checkpoint, "--checkpoint"),
        accuracy_reports=_plan_paths(args.accuracy, "--accuracy"),
        max_len=args.max_len,
        run_layers=args.run_layers,
        embedding=args.embedding,
        head=args.head,
        queries=args.queries,
        texts=tuple(args.text) if args.text else DEFAULT_TEXTS,
        network=network_from_args(args),
        use_namespaces=not args.no_namespaces,
        force_relay=args.via_relay,
        probe=not args.no_probe,
        out=args.out,
        work_dir=args.work_dir,
        link_timeout_s=args.link_timeout,
        session_timeout_s=args.session_timeout,
        seed=args.seed,
        command="cipherprompt " + shlex.join(sys.argv[1:]),
    )


def _exit_on_signal(signum, frame) -> None:
    # Unwinds like an exception, so the network's clean-up runs.
    raise SystemExit(128 + signum)


def cmd_bench(args) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    if args.reproduce is not None:
        from cipherprompt.bench.reproduce import reproduce

        return reproduce(args, args.bench_parser)
    record = run_bench(config_from_args(args))
    print(format_report(record), end="")
    print(f"record: {record['out']}")
    return 0

