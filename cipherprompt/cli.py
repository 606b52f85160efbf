"""Command-line interface: a thin layer over the importable functions of each module."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("cipherprompt")

DEFAULT_WORK_DIR = Path("cipherprompt-work")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from cipherprompt.train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, serve_len=args.max_len,
                        seed=args.seed, train_limit=args.train_limit)
    report = train_teacher(args.work_dir / "teacher", cfg)
    print(f"teacher test accuracy {report['test_accuracy']:.4f} "
          f"(validation {report['validation_accuracy']:.4f}, plaintext float32); "
          f"checkpoint {args.work_dir / 'teacher' / 'teacher.npz'}")
    return 0


def cmd_baseline(args) -> int:
    from cipherprompt.data import load_splits
    from cipherprompt.train.baseline import run_tfidf_baseline
    from cipherprompt.train.teacher import write_json

    report = run_tfidf_baseline(load_splits(seed=args.seed))
    report["command"] = "cipherprompt baseline"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.work_dir / "baseline-report.json", report)
    print(f"TF-IDF + logistic regression: test accuracy {report['test_accuracy']:.4f} "
          f"(validation {report['validation_accuracy']:.4f}, C={report['C']})")
    return 0


def cmd_serve(args) -> int:
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.secure.server import ModelServer, ServerConfig

    config = ServerConfig(host=args.host, port=args.port, max_sessions=args.max_sessions,
                          idle_timeout_s=args.idle_timeout, work_dir=args.work_dir / "server")
    server = ModelServer(args.checkpoint, config, EngineConfig(protocol=args.protocol),
                         max_len=args.max_len)
    host, port = server.bind()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_classify(args) -> int:
    from cipherprompt.secure.client import PrivateClassifier
    from cipherprompt.secure.cost import format_cost_table, write_cost

    with PrivateClassifier(args.server, work_dir=args.work_dir / "client",
                           expected_plan=args.plan) as client:
        for index, text in enumerate(args.texts):
            prediction = client.classify(text, truncate=args.truncate,
                                         progress=_stage_progress(client))
            probabilities = ", ".join(
                f"{name} {p:.3f}" for name, p in zip(client.label_names,
                                                     prediction.probabilities)
            )
            print(f"{prediction.label_name}  ({probabilities})")
            print(format_cost_table(prediction.cost))
            if args.json is not None:
                path = args.json if len(args.texts) == 1 else args.json.with_name(
                    f"{args.json.stem}-{index}{args.json.suffix}")
                write_cost(path, prediction.cost, {
                    "label": prediction.label_name,
                    "probabilities": prediction.probabilities.tolist(),
                    "num_tokens": prediction.num_tokens,
                    "max_len": client.max_len,
                    "plan": client.plan.name,
                })
    return 0


def _stage_progress(client):
    total_stages = len(client.model.stages)

    def report(index, total, name):
        print(f"\r  private run: stage {index + 1}/{total_stages} ({name})   ", end="",
              file=sys.stderr, flush=True)
        if index + 1 == total:
            print(file=sys.stderr)

    return report if sys.stderr.isatty() else None


def cmd_health(args) -> int:
    from cipherprompt.secure.launch import check_health

    status = check_health(args.server, timeout_s=args.timeout)
    print(" ".join(f"{key}={value}" for key, value in status.items()))
    return 0


def cmd_demo(args) -> int:
    from cipherprompt.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(work_dir=args.work_dir, sentences=args.sentences,
                               port=args.port, epochs=args.epochs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cipherprompt",
        description="Private inference of transformer models: the client's text and the "
                    "server's weights stay private (SPU CHEETAH two-party computation).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def work_dir_option(sub):
        sub.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                         help="folder for every output of the run (default: %(default)s)")

    demo = commands.add_parser("demo", help="train (once), serve and classify real sentences")
    work_dir_option(demo)
    demo.add_argument("--sentences", type=int, default=4,
                      help="test sentences to classify privately (default: %(default)s)")
    demo.add_argument("--port", type=int, default=0,
                      help="server port on 127.0.0.1; 0 picks a free one (default)")
    demo.add_argument("--epochs", type=int, default=2,
                      help="teacher epochs when no cached teacher exists (default: %(default)s)")
    demo.set_defaults(handler=cmd_demo)

    train = commands.add_parser("train", help="fine-tune the exact-operator teacher")
    work_dir_option(train)
    train.add_argument("--epochs", type=int, default=2, help="epochs (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    train.add_argument("--learning-rate", type=float, default=5e-5, help="default: %(default)s")
    train.add_argument("--max-len", type=int, default=32,
                       help="serving sequence length saved in the checkpoint, in tokens "
                            "(default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="split and training seed")
    train.add_argument("--train-limit", type=int, default=None,
                       help="use only the first N training examples (smoke tests)")
    train.set_defaults(handler=cmd_train)

    baseline = commands.add_parser("baseline", help="TF-IDF + logistic regression baseline")
    work_dir_option(baseline)
    baseline.add_argument("--seed", type=int, default=0, help="split seed")
    baseline.set_defaults(handler=cmd_baseline)

    serve = commands.add_parser("serve", help="run the server role for a checkpoint")
    work_dir_option(serve)
    serve.add_argument("--checkpoint", type=Path,
                       default=DEFAULT_WORK_DIR / "teacher" / "teacher.npz",
                       help="checkpoint to serve (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=7870, help="TCP port (default: %(default)s)")
    serve.add_argument("--max-len", type=int, default=None,
                       help="sequence length in tokens (default: the checkpoint's)")
    serve.add_argument("--max-sessions", type=int, default=1,
                       help="sessions at once; more clients get 'busy' (default: %(default)s)")
    serve.add_argument("--idle-timeout", type=float, default=600.0,
                       help="seconds a session may wait for the client (default: %(default)s)")
    serve.add_argument("--protocol", default="CHEETAH", choices=["CHEETAH", "SEMI2K", "REF2K"],
                       help="SPU protocol; REF2K has no cryptography (default: %(default)s)")
    serve.set_defaults(handler=cmd_serve)

    classify = commands.add_parser("classify", help="classify texts privately (client role)")
    work_dir_option(classify)
    classify.add_argument("--server", required=True, help="server address HOST:PORT")
    classify.add_argument("--truncate", action="store_true",
                          help="truncate texts longer than the server's sequence length")
    classify.add_argument("--plan", default=None,
                          help="refuse to run unless the server's operator plan has this name")
    classify.add_argument("--json", type=Path, default=None,
                          help="write the prediction and cost of each query as JSON here")
    classify.add_argument("texts", nargs="+", help="texts to classify")
    classify.set_defaults(handler=cmd_classify)

    health = commands.add_parser("health", help="ask a server whether it is serving")
    health.add_argument("--server", required=True, help="server address HOST:PORT")
    health.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    health.set_defaults(handler=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        # Expected failures (bad input, missing files, unreachable server) as one clear line.
        log.debug("details", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
