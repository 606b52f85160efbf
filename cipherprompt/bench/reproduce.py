"""``cipherprompt bench --reproduce RECORD``: run a recorded bench again and compare the figures.

A bench record keeps the command line that made it, the engine settings and, per plan, the
weights it ran. Reproducing a record parses that command line again with the bench parser, runs
it under the recorded engine settings into a new record, and sets both side by side.

Bytes and messages per query do not depend on the machine's load: two runs of one configuration
agreed to within 0.1 MB. They are checked against a relative tolerance. Seconds depend on the
machine and its load, so they are reported and not checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
from pathlib import Path

# Options that decide what a run measures. With --reproduce they come from the record.
MEASURED_OPTIONS = ("model", "config", "plans", "checkpoint", "accuracy", "max_len", "run_layers",
                    "embedding", "head", "queries", "text", "network", "bandwidth", "rtt",
                    "seed")
DEFAULT_TOLERANCE = 0.05


class ReproduceError(ValueError):
    """Error raised when a record cannot be reproduced; the message gives the cause and the fix."""


def load_record(path: Path) -> dict:
    """Read a bench record, or raise ReproduceError naming the path and the problem."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReproduceError(f"bench record {path} not found; pass a JSON record written by "
                             "cipherprompt bench, e.g. benchmarks/results/"
                             "small-h128-l1-32-wan.json") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ReproduceError(f"cannot read bench record {path}: {error}") from None
    if not isinstance(record, dict) or not str(record.get("command", "")).startswith(
            "cipherprompt bench") or "plans" not in record:
        raise ReproduceError(f"{path} is not a record of cipherprompt bench (it needs 'command' "
                             "and 'plans'); the .json beside a bench .md table is one")
    return record


def recorded_arguments(record: dict, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the record's command line with the bench parser.

    The caller replaces the recorded --out and --work-dir.
    """
    words = shlex.split(record["command"])[2:]
    if "--reproduce" in words:
        raise ReproduceError("the record was itself made by --reproduce; reproduce the record "
                             "it names instead")
    try:
        args = parser.parse_args(words)
    except SystemExit:
        raise ReproduceError("the record's command line is not valid for this version of "
                             f"cipherprompt bench: {record['command']}") from None
    return args


def check_given_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject options that would change what a reproduction measures."""
    changed = [name for name in MEASURED_OPTIONS
               if getattr(args, name) != parser.get_default(name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ReproduceError(f"--reproduce takes what runs from the record; drop {flags} (only "
                             "--out, --work-dir, --tolerance and the timeouts may be given)")


def check_weights(record: dict, config) -> None:
    """Raise ReproduceError when a recorded checkpoint is missing or contains other weights."""
    from cipherprompt.checkpoint import load_checkpoint

    for plan, path in config.checkpoints.items():
        expected = record["plans"].get(plan, {}).get("weights", {}).get("sha256")
        if not Path(path).is_file():
            raise ReproduceError(f"plan {plan} ran checkpoint {path}, which is not found here; "
                                 "make it with the command in docs/benchmarks.md (cipherprompt "
                                 "train or distill) and run from the folder the record was made in")
        digest = load_checkpoint(Path(path)).weights_digest()
        if expected is not None and digest != expected:
            raise ReproduceError(f"checkpoint {path} contains weights {digest[:12]}..., but the "
                                 f"record's plan {plan} ran {expected[:12]}...; bytes would not "
                                 "be comparable")


def reproduction_out(record_path: Path, work_dir: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return work_dir / f"reproduce-{Path(record_path).stem}-{stamp}.json"


def _total_bytes(figures: dict) -> float:
    return figures["bytes_client_to_server"] + figures["bytes_server_to_client"]


def _relative(new: float, old: float) -> float:
    if old:
        return (new - old) / old
    if new == old:
        return 0.0
    return float("inf")


def compare(recorded: dict, measured: dict, tolerance: float) -> dict:
    """Return per-plan and per-ratio differences and whether bytes and messages reproduced."""
    plans = []
    for name, old_plan in recorded["plans"].items():
        new_plan = measured["plans"].get(name)
        if new_plan is None:
            plans.append({"plan": name, "reproduced": False, "reason": "did not run"})
            continue
        old, new = old_plan["per_query"], new_plan["per_query"]
        row = {"plan": name}
        for key, value in (("bytes", _total_bytes), ("messages", lambda f: f["messages"]),
                           ("seconds", lambda f: f["seconds"])):
            row[key] = {"recorded": value(old), "measured": value(new),
                        "relative_difference": _relative(value(new), value(old))}
        row["reproduced"] = all(abs(row[key]["relative_difference"]) <= tolerance
                                for key in ("bytes", "messages"))
        plans.append(row)
    ratio_rows = []
    measured_ratios = {(row["numerator"], row["denominator"]): row for row in measured["ratios"]}
    for old in recorded["ratios"]:
        new = measured_ratios.get((old["numerator"], old["denominator"]))
        if new is None:
            continue
        ratio_rows.append({
            "ratio": f"{old['numerator']} / {old['denominator']}",
            **{key: {"recorded": old[key], "measured": new[key]}
               for key in ("time", "communication", "messages")},
            "reproduced": all(abs(_relative(new[key], old[key])) <= tolerance
                              for key in ("communication", "messages")),
        })
    return {
        "tolerance": tolerance,
        "checked": "bytes both ways and messages per query, each within the tolerance of the "
                   "record; seconds depend on the machine's load and are not checked",
        "plans": plans,
        "ratios": ratio_rows,
        "reproduced": all(row["reproduced"] for row in plans + ratio_rows),
    }


def _percent(value: float) -> str:
    return f"{value * 100:+.1f}%"


def format_comparison(record_path: Path, recorded: dict, measured: dict, result: dict) -> str:
    """Return the recorded and new figures of each plan and ratio, and the verdict, as Markdown."""
    from cipherprompt.bench.compare import _format_bytes, _format_seconds

    lines = [
        f"# Reproduction of {record_path}",
        "",
        f"- Recorded: {recorded.get('started', 'unknown')}, machine "
        f"{recorded['machine']['cpu']}, load average {recorded['load_average']['start'][0]:.1f}",
        f"- Measured: {measured['started']}, machine {measured['machine']['cpu']}, load average "
        f"{measured['load_average']['start'][0]:.1f}",
        f"- Engine: {json.dumps(measured['engine'], sort_keys=True)}",
        f"- Checked: {result['checked']} (tolerance {result['tolerance'] * 100:g}%)",
        "",
        "| plan | bytes recorded | bytes now | difference | messages recorded | messages now | "
        "difference | seconds recorded | seconds now | reproduced |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["plans"]:
        if "bytes" not in row:
            lines.append(f"| {row['plan']} | | | | | | | | | no: {row['reason']} |")
            continue
        size, count, wall = row["bytes"], row["messages"], row["seconds"]
        lines.append(
            f"| {row['plan']} | {_format_bytes(size['recorded'])} | "
            f"{_format_bytes(size['measured'])} | {_percent(size['relative_difference'])} | "
            f"{count['recorded']:,.0f} | {count['measured']:,.0f} | "
            f"{_percent(count['relative_difference'])} | {_format_seconds(wall['recorded'])} | "
            f"{_format_seconds(wall['measured'])} | {'yes' if row['reproduced'] else 'no'} |")
    if result["ratios"]:
        lines += ["", "| ratio | time recorded / now | communication recorded / now | "
                      "messages recorded / now | reproduced |", "| --- | --- | --- | --- | --- |"]
        for row in result["ratios"]:
            cells = " | ".join(f"{row[key]['recorded']:.2f} / {row[key]['measured']:.2f}"
                               for key in ("time", "communication", "messages"))
            lines.append(f"| {row['ratio']} | {cells} | "
                         f"{'yes' if row['reproduced'] else 'no'} |")
    verdict = ("reproduced: every plan's bytes and messages per query are within the tolerance"
               if result["reproduced"] else
               "NOT reproduced: the rows marked 'no' differ by more than the tolerance")
    return "\n".join(lines + ["", verdict]) + "\n"


def reproduce(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the record named by ``args.reproduce`` again; print the comparison.

    Returns 0 when bytes and messages reproduced, 1 when they did not.
    """
    from cipherprompt.bench.compare import config_from_args, format_report, run_bench
    from cipherprompt.files import write_json, write_text_atomically
    from cipherprompt.secure.engine import EngineConfig

    if not 0 < args.tolerance < 1:
        raise ReproduceError(f"--tolerance must lie between 0 and 1, got {args.tolerance}; "
                             f"e.g. {DEFAULT_TOLERANCE} for 5%")
    check_given_options(args, parser)
    record_path = Path(args.reproduce)
    recorded = load_record(record_path)
    rerun = recorded_arguments(recorded, parser)
    rerun.out = args.out or reproduction_out(record_path, args.work_dir)
    rerun.work_dir = args.work_dir
    rerun.link_timeout = args.link_timeout
    rerun.session_timeout = args.session_timeout
    config = config_from_args(rerun)
    engine = recorded.get("engine") or EngineConfig().to_dict()
    try:
        EngineConfig(**engine)
    except (TypeError, ValueError) as error:
        raise ReproduceError(f"the record's engine settings {engine} are not valid for this "
                             f"version: {error}") from None
    config = dataclasses.replace(
        config, engine=engine,
        command=("cipherprompt bench --reproduce " + shlex.quote(str(record_path))
                 + f" (runs: {recorded['command']})"))
    check_weights(recorded, config)

    measured = run_bench(config)
    print(format_report(measured), end="")
    result = compare(recorded, measured, args.tolerance)
    result["engine_same_as_default"] = engine == EngineConfig().to_dict()
    result["record"] = str(record_path)
    measured["reproduces"] = result
    out = Path(measured.pop("out"))
    write_json(out, measured)
    text = format_comparison(record_path, recorded, measured, result)
    write_text_atomically(out.with_suffix(".comparison.md"), text)
    print()
    print(text, end="")
    print(f"record: {out}\ncomparison: {out.with_suffix('.comparison.md')}")
    return 0 if result["reproduced"] else 1
