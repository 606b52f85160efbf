"""Measure what the distillation's substitution order should be, in plaintext float32.

Two measurements on the validation split, written to one JSON file:

1. Sensitivity: the teacher with the target plan's operators in one layer only, without any
   training, for each layer in turn (and in all layers at once). For each it records the
   validation accuracy, the label agreement with the teacher and the mean KL divergence from
   the teacher's class distribution to the student's.
2. Orders: short distillation runs of the same target plan that differ only in the order in
   which layers are substituted (default: bottom-up 0..N-1 and top-down N-1..0). They use the
   same steps per stage and no final fine-tune, so the order is the only difference. Each
   stage's validation accuracy comes from the run's report.

Example, the friendly plan on the Rotten Tomatoes teacher (about 25 minutes on 2 quiet cores):

    python benchmarks/substitution_order.py --teacher cipherprompt-work/teacher/teacher.npz \\
        --work-dir cipherprompt-work/order --out benchmarks/results/minilm-substitution-order.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))


def class_kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(teacher || student) of the class distributions, in nats."""
    def log_softmax(logits: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    teacher_log = log_softmax(teacher_logits.astype(np.float64))
    student_log = log_softmax(student_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(teacher_log) * (teacher_log - student_log), axis=-1)))


def measure_sensitivity(teacher, target_plan, validation) -> list[dict]:
    """Score the teacher with the target operators in each single layer, then in all layers."""
    from cipherprompt.plan import OperatorPlan
    from cipherprompt.train.teacher import accuracy, predict_logits

    teacher_logits = predict_logits(teacher.params, teacher.config, teacher.plan, validation)
    teacher_labels = np.argmax(teacher_logits, axis=-1)
    variants = [(f"layer {index}", [index]) for index in range(teacher.plan.num_layers)]
    variants.append(("all layers", list(range(teacher.plan.num_layers))))

    rows = []
    for label, layers in variants:
        started = time.perf_counter()
        mixed = tuple(target_plan.layers[index] if index in layers else layer
                      for index, layer in enumerate(teacher.plan.layers))
        plan = OperatorPlan(f"{teacher.plan.name}-with-{label.replace(' ', '-')}", mixed,
                            embedding_normaliser=teacher.plan.embedding_normaliser,
                            final_normaliser=teacher.plan.final_normaliser)
        logits = predict_logits(teacher.params, teacher.config, plan, validation)
        rows.append({
            "substituted": label,
            "layers": layers,
            "validation_accuracy": accuracy(logits, validation.labels),
            "agreement_with_teacher": float(np.mean(np.argmax(logits, axis=-1) == teacher_labels)),
            "kl_from_teacher": class_kl(teacher_logits, logits),
            "seconds": time.perf_counter() - started,
        })
        print(f"sensitivity {label}: accuracy {rows[-1]['validation_accuracy']:.4f}, "
              f"KL {rows[-1]['kl_from_teacher']:.4f}", flush=True)
    rows.insert(0, {"substituted": "none (teacher)", "layers": [],
                    "validation_accuracy": accuracy(teacher_logits, validation.labels),
                    "agreement_with_teacher": 1.0, "kl_from_teacher": 0.0})
    return rows


def run_order(name: str, order: list[int], args, data) -> dict:
    """Run one short distillation with ``order`` and return each stage's validation accuracy."""
    from cipherprompt.train.distill import DistillConfig, distill

    cfg = DistillConfig(plan=args.plan, order=tuple(order), steps_per_stage=args.steps_per_stage,
                        final_steps=0, seed=args.seed)
    started = time.perf_counter()
    report = distill(args.work_dir / name, args.teacher, cfg, data=data)
    stages = [{"stage": record["name"], "layer": record["layer"],
               "validation_accuracy": record["validation_accuracy"],
               "probe_after": record["probe_after"]} for record in report["stages"]]
    result = {"order": order, "stages": stages,
              "final_validation_accuracy": report["validation_accuracy"],
              "test_accuracy": report["test_accuracy"],
              "seconds": time.perf_counter() - started}
    print(f"order {name} {order}: validation accuracy per stage "
          + ", ".join(f"{stage['validation_accuracy']:.4f}" for stage in stages), flush=True)
    return result


def parse_orders(text: str, num_layers: int) -> dict[str, list[int]]:
    """Parse 'bottom-up,top-down' or explicit orders such as 'a=0-1-2-3-4-5'."""
    orders = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "bottom-up":
            orders[item] = list(range(num_layers))
        elif item == "top-down":
            orders[item] = list(reversed(range(num_layers)))
        elif "=" in item:
            name, _, layers = item.partition("=")
            try:
                orders[name] = [int(layer) for layer in layers.split("-")]
            except ValueError:
                raise SystemExit(f"invalid order {item!r}: write NAME=0-1-2 with layer indices")
        else:
            raise SystemExit(f"invalid order {item!r}: use bottom-up, top-down or NAME=0-1-2")
    return orders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint")
    parser.add_argument("--plan", default="friendly", help="target plan (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="folder for the distillation runs, one subfolder per order")
    parser.add_argument("--orders", default="bottom-up,top-down",
                        help="orders to compare: bottom-up, top-down or NAME=0-1-2 "
                             "(default: %(default)s)")
    parser.add_argument("--steps-per-stage", type=int, default=20,
                        help="optimizer steps per layer stage (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-orders", action="store_true",
                        help="measure the sensitivity only")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()

    from cipherprompt.files import write_text_atomically
    from cipherprompt.bench.machine import load_now, machine_facts
    from cipherprompt.checkpoint import load_checkpoint
    from cipherprompt.plan import OperatorPlan
    from cipherprompt.train.distill import DistillConfig, load_distill_data

    teacher = load_checkpoint(args.teacher)
    target_plan = OperatorPlan.preset(args.plan, teacher.plan.num_layers)
    orders = parse_orders(args.orders, teacher.plan.num_layers)
    data = load_distill_data(DistillConfig(plan=args.plan, seed=args.seed))
    load_start = load_now()

    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "teacher": {"path": str(args.teacher), "weights_sha256": teacher.weights_digest(),
                    "plan": teacher.plan.name},
        "target_plan": args.plan,
        "validation_size": len(data.validation),
        "measured_in": "plaintext float32 (JAX, CPU)",
        "machine": machine_facts(),
        "sensitivity": measure_sensitivity(teacher, target_plan, data.validation),
    }
    if not args.skip_orders:
        record["steps_per_stage"] = args.steps_per_stage
        record["orders"] = {name: run_order(name, order, args, data)
                            for name, order in orders.items()}
    record["load_average"] = {"start": load_start, "end": load_now()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
