"""Measure what each non-linear operator costs per element under CHEETAH.

Every registered operator (activations, attention normalisers, layer normalisers) runs on
secret inputs between a server process and a client process joined by SPU's link on
127.0.0.1, with the project's engine defaults (CHEETAH, FM64). Each operator runs at two
sizes, so that the fixed cost of a call and the cost per element separate:
cost(n) = fixed + n x per_element, fitted through the medians of the two sizes.

How each kind is shaped:

- activations: a flat vector of n elements;
- attention normalisers: scores [rows / 32, 32, 32], that is heads x queries x keys with rows
  of 32 keys, and a client-owned key mask of 32 ones as in the model;
- layer normalisers: [n / 384 rounded, 384] with server-owned gamma and beta, as in MiniLM.

Inputs are drawn uniformly from the operator's fitted range, or from ``DEFAULT_RANGES`` for
operators without one. The client owns them, and a first program adds a server-owned zero, so
that the operator sees a secret shared by both parties, like an intermediate value of the
model. Only the operator's own program is costed. Before measuring, every operator runs once at
the small size: that warm-up absorbs one-time costs (OT and HE set-up) and is discarded.

Usage (about 10 minutes on 2 cores):

    python benchmarks/operator_costs.py

It writes the JSON atomically to ``cipherprompt/ops/operator-costs.json``, package data that
``Operator.cheetah_cost()`` reads, and regenerates the table of ``docs/operators.md``.
``--render-only`` regenerates the table from an existing JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("operator_costs")

DEFAULT_SIZES = (4096, 32768)
# Input range of operators that state no fitted range: the exact operators and those that
# approximate nothing (2quad, relu_norm, mean_centre).
DEFAULT_RANGES = {
    "activation": (-8.0, 8.0),
    "attention_normaliser": (-8.0, 8.0),
    "layer_normaliser": (-4.0, 4.0),
}
ROW_LENGTH = 32  # keys per attention row
HIDDEN = 384  # MiniLM's hidden size
LAYER_NORM_EPS = 1e-12


def operator_classes(selected: list[str] | None = None) -> list[type]:
    """Return every registered operator class, or those named ``kind/name`` in ``selected``."""
    from cipherprompt.ops import ACTIVATIONS, ATTENTION_NORMALISERS, LAYER_NORMALISERS
    from cipherprompt.ops.costs import operator_key

    classes = [*ACTIVATIONS.values(), *ATTENTION_NORMALISERS.values(),
               *LAYER_NORMALISERS.values()]
    if not selected:
        return classes
    known = {operator_key(cls.kind, cls.name): cls for cls in classes}
    unknown = [key for key in selected if key not in known]
    if unknown:
        raise ValueError(f"unknown operators {', '.join(unknown)}; valid choices: "
                         f"{', '.join(known)}")
    return [known[key] for key in selected]


def input_shape(kind: str, size: int) -> tuple[int, ...]:
    """Return the input shape of an operator of ``kind`` with about ``size`` elements."""
    if kind == "attention_normaliser":
        return (max(1, round(size / ROW_LENGTH**2)), ROW_LENGTH, ROW_LENGTH)
    if kind == "layer_normaliser":
        return (max(1, round(size / HIDDEN)), HIDDEN)
    return (size,)


def check_sizes(classes: list[type], sizes: tuple[int, ...]) -> None:
    """Raise ValueError when two sizes give one operator kind the same input shape."""
    for kind in sorted({cls.kind for cls in classes}):
        shapes = [input_shape(kind, size) for size in sizes]
        if len(set(shapes)) != len(shapes):
            raise ValueError(
                f"--sizes {','.join(map(str, sizes))} give {kind} operators the same input "
                f"shapes {shapes}; choose sizes further apart (attention normalisers grow "
                f"in steps of {ROW_LENGTH**2} elements, layer normalisers in steps of {HIDDEN})"
            )


def input_range(cls) -> tuple[tuple[float, float], str]:
    if cls.fitted_range is not None:
        return tuple(cls.fitted_range), "fitted_range"
    return DEFAULT_RANGES[cls.kind], "default for the kind (no fitted range)"


def apply_operator(cls, z, mask, gamma, beta):
    """Apply ``cls`` to ``z`` as the model does: the mask or gamma and beta by kind."""
    operator = cls()
    if cls.kind == "attention_normaliser":
        return operator(z, mask[None, None, :])
    if cls.kind == "layer_normaliser":
        return operator(z, gamma, beta, LAYER_NORM_EPS)
    return operator(z)


def compile_programs(classes: list[type], sizes: tuple[int, ...], engine) -> dict:
    """Compile, per operator and size, a program of two stages: ``prepare`` and ``operator``."""
    from cipherprompt.secure.engine import CompiledModel, Stage, compile_executable

    programs = {}
    for cls in classes:
        for size in sizes:
            shape = input_shape(cls.kind, size)
            x = np.zeros(shape, np.float32)
            prepare = compile_executable("prepare", lambda x, r: x + r, [x, x],
                                         ["bench:x", "bench:r"], ["bench:z"], engine)
            mask = np.zeros(ROW_LENGTH, np.float32)
            norm = np.zeros(HIDDEN, np.float32)

            def run(z, mask, gamma, beta, cls=cls):
                return apply_operator(cls, z, mask, gamma, beta)

            names = ["bench:z", "bench:mask", "bench:gamma", "bench:beta"]
            executable = compile_executable(f"{cls.kind}_{cls.name}", run, [x, mask, norm, norm],
                                            names, ["bench:y"], engine)
            stages = [
                Stage("prepare", prepare, ["bench:r"], ["bench:x"], "bench:z"),
                Stage("operator", executable, ["bench:gamma", "bench:beta"], ["bench:mask"],
                      "bench:y", frees=["bench:z"]),
            ]
            programs[program_key(cls, size)] = CompiledModel(stages, "")
    return programs


def program_key(cls, size: int) -> str:
    return f"{cls.kind}/{cls.name}@{size}"


def draw_inputs(cls, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw one run's inputs: x from the operator's range, the mask, gamma and beta."""
    shape = input_shape(cls.kind, size)
    (low, high), _ = input_range(cls)
    return {
        "x": rng.uniform(low, high, size=shape).astype(np.float32),
        "mask": np.ones(ROW_LENGTH, np.float32),
        "gamma": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
        "beta": rng.uniform(-0.1, 0.1, HIDDEN).astype(np.float32),
    }


def infeed(pair, inputs: dict[str, np.ndarray]) -> None:
    """Infeed x and the mask as the client's, a zero r, gamma and beta as the server's."""
    from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK

    pair.set_secrets({"bench:x": inputs["x"], "bench:mask": inputs["mask"]}, CLIENT_RANK)
    pair.set_secrets({"bench:r": np.zeros_like(inputs["x"]), "bench:gamma": inputs["gamma"],
                      "bench:beta": inputs["beta"]}, SERVER_RANK)


def run_record(cost, size: int, shape: tuple[int, ...]) -> dict:
    """Summarise the client's view of the ``operator`` stage of one run."""
    stage = next(stage for stage in cost.client.stages if stage.stage == "operator")
    prepare = next(stage for stage in cost.client.stages if stage.stage == "prepare")
    return {
        "elements": int(np.prod(shape)),
        "shape": list(shape),
        "requested_size": size,
        "seconds": stage.seconds,
        "bytes_sent": stage.bytes_sent,
        "bytes_received": stage.bytes_received,
        "bytes": stage.bytes_sent + stage.bytes_received,
        "messages": stage.messages_sent + stage.messages_received,
        "prepare_bytes": prepare.bytes_sent + prepare.bytes_received,
        "spu_operators": {row.operator: {"seconds": row.seconds,
                                         "bytes": row.bytes_sent + row.bytes_received,
                                         "messages": row.messages_sent + row.messages_received}
                          for row in stage.operators},
    }


METRICS = ("seconds", "bytes_sent", "bytes_received", "bytes", "messages")


def fit(runs_by_size: list[dict]) -> tuple[dict, dict]:
    """Fit cost = fixed + elements x per_element through the smallest and largest size."""
    small, large = runs_by_size[0], runs_by_size[-1]
    span = large["elements"] - small["elements"]
    per_element = {key: (large[key] - small[key]) / span for key in METRICS}
    fixed = {key: small[key] - per_element[key] * small["elements"] for key in METRICS}
    return per_element, fixed


def median_run(runs: list[dict]) -> dict:
    """Return the medians of ``runs`` (one size) for every metric."""
    return {"elements": runs[0]["elements"], "shape": runs[0]["shape"],
            **{key: float(np.median([run[key] for run in runs])) for key in METRICS}}


def plaintext_error(cls, inputs: dict[str, np.ndarray], output: np.ndarray) -> float:
    """Return the max abs difference between ``output`` and the float32 operator."""
    import jax.numpy as jnp

    expected = apply_operator(cls, *(jnp.asarray(inputs[key])
                                     for key in ("x", "mask", "gamma", "beta")))
    return float(np.max(np.abs(np.asarray(expected, np.float64)
                               - np.asarray(output, np.float64))))


def measure(classes: list[type], sizes: tuple[int, ...], repeat: int, work_dir: Path,
            seed: int) -> dict:
    """Run every operator at every size ``repeat`` times; return the entries by operator key."""
    from tqdm import tqdm

    from cipherprompt.ops.costs import operator_key
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.secure.pair import PartyPair

    engine = EngineConfig()
    log.info("compiling %d programs", len(classes) * len(sizes))
    programs = compile_programs(classes, sizes, engine)
    rng = np.random.default_rng(seed)
    entries: dict[str, dict] = {}
    with PartyPair(programs, engine, work_dir) as pair:
        log.info("parties ready in %.1f s; SPU logs in %s", pair.setup_seconds, work_dir)
        for cls in tqdm(classes, desc="warm-up", unit="operator"):
            infeed(pair, draw_inputs(cls, sizes[0], rng))
            pair.run(program_key(cls, sizes[0]))
            pair.delete(["bench:y"])

        with tqdm(total=len(classes) * len(sizes) * repeat, desc="measure",
                  unit="run") as progress:
            for cls in classes:
                runs: dict[int, list[dict]] = {size: [] for size in sizes}
                errors = []
                for _ in range(repeat):
                    for size in sizes:
                        progress.set_postfix_str(f"{cls.kind}/{cls.name} {size}")
                        inputs = draw_inputs(cls, size, rng)
                        infeed(pair, inputs)
                        cost = pair.run(program_key(cls, size))
                        output = pair.reveal("bench:y")
                        pair.delete(["bench:y"])
                        record = run_record(cost, size, inputs["x"].shape)
                        record["max_abs_error"] = plaintext_error(cls, inputs, output)
                        # Seconds are only as good as the load they ran under.
                        record["load_average_1_min"] = os.getloadavg()[0]
                        runs[size].append(record)
                        errors.append(record["max_abs_error"])
                        progress.update(1)
                entries[operator_key(cls.kind, cls.name)] = _entry(cls, runs, errors)
    return entries


def _entry(cls, runs: dict[int, list[dict]], errors: list[float]) -> dict:
    by_size = [median_run(runs[size]) for size in sorted(runs)]
    per_element, fixed = fit(by_size)
    (low, high), source = input_range(cls)
    return {
        "kind": cls.kind,
        "name": cls.name,
        "formula": cls.formula,
        "input_range": [low, high],
        "input_range_source": source,
        "per_element": per_element,
        "fixed": fixed,
        "runs_by_size": by_size,
        "runs": [run for size in sorted(runs) for run in runs[size]],
        "cheetah_max_abs_error": max(errors),
    }


def check_out(out: Path, operators: str | None) -> None:
    """Raise ValueError when a subset of operators would replace the full results file."""
    from cipherprompt.ops.costs import RESULTS_PATH

    if operators and Path(out).resolve() == RESULTS_PATH.resolve():
        raise ValueError(
            f"--operators measures a subset, which would drop the other operators from "
            f"{RESULTS_PATH}; pass another --out, or measure every operator"
        )


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted(int(part) for part in text.split(",")))
    except ValueError:
        raise ValueError(f"invalid --sizes {text!r}; expected element counts separated by "
                         "commas, e.g. 4096,32768") from None
    if len(sizes) < 2 or sizes[0] < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"--sizes needs at least two different positive sizes, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure each operator's CHEETAH cost per element between two processes "
                    "on 127.0.0.1 and regenerate the table of docs/operators.md.")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON to write (default: the package data file "
                             "cipherprompt/ops/operator-costs.json)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="Markdown file whose operator table to regenerate (default: "
                             "docs/operators.md); 'none' skips it")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="input sizes in elements, comma-separated (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per operator and size; costs are their medians "
                             "(default: %(default)s)")
    parser.add_argument("--operators", default=None,
                        help="only these operators, as kind/name separated by commas, e.g. "
                             "activation/relu,layer_normaliser/layernorm (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work/operator-costs"),
                        help="folder for the parties' SPU logs (default: %(default)s)")
    parser.add_argument("--render-only", action="store_true",
                        help="regenerate the table from the existing --out file without "
                             "measuring")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cipherprompt.files import write_text_atomically
    from cipherprompt.bench.machine import load_now, machine_facts
    from cipherprompt.ops.costs import DOC_PATH, RESULTS_PATH, update_doc
    from cipherprompt.secure.engine import EngineConfig

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = args.out or RESULTS_PATH
    doc = None if str(args.doc) == "none" else (args.doc or DOC_PATH)
    try:
        if args.render_only:
            results = json.loads(out.read_text())
        else:
            if args.repeat < 1:
                raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
            sizes = parse_sizes(args.sizes)
            check_out(out, args.operators)
            classes = operator_classes(args.operators.split(",") if args.operators else None)
            check_sizes(classes, sizes)
            machine = {**machine_facts(), **load_now()}
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            entries = measure(classes, sizes, args.repeat, args.work_dir, args.seed)
            results = {
                "benchmark": "benchmarks/operator_costs.py",
                "command": shlex.join(["python", "benchmarks/operator_costs.py",
                                       *(sys.argv[1:] if argv is None else argv)]),
                "created": started,
                "view": "client: bytes_sent goes from client to server, bytes_received back",
                "engine": EngineConfig().to_dict(),
                "sizes": list(sizes),
                "repeat": args.repeat,
                "shapes": {"attention_normaliser": f"[rows / {ROW_LENGTH}, {ROW_LENGTH}, "
                                                   f"{ROW_LENGTH}] with a key mask",
                           "layer_normaliser": f"[rows, {HIDDEN}] with gamma and beta",
                           "activation": "[n]"},
                "machine": machine,
                "load_after": load_now(),
                "operators": entries,
            }
            write_text_atomically(out, json.dumps(results, indent=2) + "\n")
            log.info("wrote %s", out)
        if doc is not None:
            changed = update_doc(doc, results)
            log.info("operator table in %s %s", doc, "updated" if changed else "unchanged")
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
