"""Count CHEETAH element-wise product batches that come back wrong, per engine setting.

CHEETAH multiplies two secret-shared vectors with BFV homomorphic encryption, 8192 elements
per ciphertext. With SPU's `enable_mul_lsb_error` on (smaller HE parameters, less traffic), a
whole batch now and then comes back as uniformly random ring elements: after truncation all
8192 values lie anywhere in +-2^(63 - fraction_bits). That is not a last-bit error, and it made
real queries return wrong logits now and then while the fixed-point reference protocol (REF2K)
of the same program stayed correct.

The benchmark runs exp on 16384 elements drawn from [-16, 0] between a server process and a
client process on 127.0.0.1, the given number of times per setting. Each multiplication inside
exp covers two product batches. It compares each output with float64 exp. A run is bad when any element is off by more than `--tolerance`; for each bad run it
records which 8192-element batches were bad. One JSON file contains both settings, the
machine and the command.

Example (about 35 minutes on 2 quiet cores):

    python benchmarks/product_faults.py --runs 1500 \\
        --out benchmarks/results/cheetah-product-faults.json --work-dir /tmp/product-faults
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

SHAPE = (32, 512)
BATCH = 8192
LOW, HIGH = -16.0, 0.0


def compile_exp(engine):
    """Compile two stages: the client's input plus a server zero, then exp of the sum.

    The first stage makes the input a secret shared by both parties, as in a real query.
    """
    import jax.numpy as jnp

    from cipherprompt.secure.engine import CompiledModel, Stage, compile_executable

    x = np.zeros(SHAPE, np.float32)
    share = compile_executable("share_input", lambda x, r: x + r, [x, x], ["p:x", "p:r"],
                               ["p:z"], engine)
    exp = compile_executable("exp", lambda z: jnp.exp(z), [x], ["p:z"], ["p:y"], engine)
    return CompiledModel([
        Stage("share_input", share, ["p:r"], ["p:x"], "p:z"),
        Stage("exp", exp, [], [], "p:y", frees=["p:z"]),
    ], "")


def run_setting(mul_lsb_error: bool, runs: int, tolerance: float, seed: int,
                work_dir: Path) -> dict:
    from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK, EngineConfig
    from cipherprompt.secure.pair import PartyPair

    engine = EngineConfig(mul_lsb_error=mul_lsb_error)
    rng = np.random.default_rng(seed)
    bad_runs = []
    seconds = []
    worst_good = 0.0
    with PartyPair({"exp": compile_exp(engine)}, engine, work_dir) as pair:
        for index in range(runs):
            x = rng.uniform(LOW, HIGH, size=SHAPE).astype(np.float32)
            pair.set_secret("p:x", x, CLIENT_RANK)
            pair.set_secret("p:r", np.zeros_like(x), SERVER_RANK)
            started = time.perf_counter()
            pair.run("exp")
            seconds.append(time.perf_counter() - started)
            y = pair.reveal("p:y").astype(np.float64)
            pair.delete(["p:y"])
            error = np.abs(y - np.exp(x.astype(np.float64))).ravel()
            if error.max() > tolerance:
                batches = [b for b in range(error.size // BATCH)
                           if error[b * BATCH:(b + 1) * BATCH].max() > tolerance]
                bad_runs.append({"run": index, "bad_elements": int((error > tolerance).sum()),
                                 "bad_batches": batches, "max_error": float(error.max())})
            else:
                worst_good = max(worst_good, float(error.max()))
            if (index + 1) % 50 == 0 or index + 1 == runs:
                print(f"mul_lsb_error={mul_lsb_error}: {index + 1}/{runs} runs, "
                      f"{len(bad_runs)} bad", file=sys.stderr, flush=True)
    return {"engine": engine.to_dict(), "runs": runs, "bad_runs": len(bad_runs),
            "bad_run_details": bad_runs, "max_error_of_good_runs": worst_good,
            "median_seconds_per_run": float(np.median(seconds))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1500, help="runs per setting")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="absolute error above which an element counts as wrong")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="on,off",
                        help="mul_lsb_error settings to run, in order (on, off)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="folder for the two parties' logs")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("on", "off")]
    if unknown or not names:
        parser.error(f"--settings takes on and/or off, got {args.settings!r}")

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from cipherprompt.files import write_text_atomically
    from cipherprompt.bench.machine import load_now, machine_facts

    record = {
        "benchmark": "benchmarks/product_faults.py",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "operation": f"exp of {SHAPE[0] * SHAPE[1]} elements from [{LOW}, {HIGH}]",
        "batch_elements": BATCH,
        "tolerance": args.tolerance,
        "machine": machine_facts(),
        "load_at_start": load_now(),
        "settings": {},
    }
    for name in names:
        record["settings"][f"mul_lsb_error_{name}"] = run_setting(
            name == "on", args.runs, args.tolerance, args.seed, args.work_dir / name)
        # Written after each setting so that an interrupted run keeps the finished one.
        write_text_atomically(args.out, json.dumps(record, indent=2) + "\n")
    for name, result in record["settings"].items():
        print(f"{name}: {result['bad_runs']} of {result['runs']} runs bad, "
              f"{result['median_seconds_per_run']:.2f} s per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
