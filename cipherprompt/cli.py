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
    from cipherprompt.files import write_json

    report = run_tfidf_baseline(load_splits(seed=args.seed))
    report["command"] = "cipherprompt baseline"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.work_dir / "baseline-report.json", report)
    print(f"TF-IDF + logistic regression: test accuracy {report['test_accuracy']:.4f} "
          f"(validation {report['validation_accuracy']:.4f}, C={report['C']})")
    return 0


def _tls_files(args, need_certificate: bool):
    """Build TLSFiles from --tls-ca, --tls-cert and --tls-key; return None when none is given."""
    from cipherprompt.secure.tls import TLSFiles

    given = [args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None)]
    if not any(given):
        return None
    if args.tls_ca is None:
        raise ValueError("TLS needs --tls-ca, the CA certificate that signs the peer's")
    files = TLSFiles(args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    if need_certificate and not files.has_certificate:
        raise ValueError("mutual TLS needs this side's --tls-cert and --tls-key besides --tls-ca")
    return files


def server_config(args):
    """Build the ServerConfig of ``serve`` or ``serve-decoder`` from the shared options."""
    from cipherprompt.secure.handshake import parse_buckets
    from cipherprompt.secure.party import DEFAULT_CONNECT_TIMEOUT_S
    from cipherprompt.secure.server import ServerConfig

    return ServerConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout, work_dir=args.work_dir / "server",
        buckets=parse_buckets(args.buckets) if args.buckets is not None else None,
        # serve-decoder has no --batch: a generation runs one prompt at a time.
        batch=getattr(args, "batch", 1),
        link_timeout_s=args.link_timeout,
        link_connect_timeout_s=min(DEFAULT_CONNECT_TIMEOUT_S, args.link_timeout),
        shutdown_grace_s=args.shutdown_grace,
        handshake_timeout_s=args.handshake_timeout,
        tls=_tls_files(args, need_certificate=True),
    )


def run_server(server) -> int:
    """Listen, stop on SIGTERM, and serve until stopped."""
    host, port = server.bind()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"listening on {host}:{port}", flush=True)
    server.serve_forever()
    return 0


def cmd_serve(args) -> int:
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.secure.logs import use_formatter
    from cipherprompt.secure.server import ModelServer

    use_formatter(args.log_json)
    if args.buckets is not None and args.max_len is not None:
        raise ValueError("pass either --max-len or --buckets; --max-len N is the same as "
                         "--buckets N")
    server = ModelServer(args.checkpoint, server_config(args),
                         EngineConfig(protocol=args.protocol), max_len=args.max_len)
    return run_server(server)


def _read_texts(args) -> list[str]:
    """Collect the texts to classify: arguments, then --file contents; '-' reads standard input."""
    texts = []
    for index, text in enumerate(args.texts):
        if text == "-":
            texts.append(_decode_text(sys.stdin.buffer.read(), "standard input"))
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"text argument {index + 1} is not valid UTF-8; pass the text in a UTF-8 file "
                "with --file PATH instead"
            ) from None
        texts.append(text)
    for path in args.file or ():
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise OSError(error.errno, f"cannot read --file {path}: {error.strerror}") from None
        texts.append(_decode_text(data, f"--file {path}"))
    if not texts:
        raise ValueError("no text to classify; pass texts as arguments, --file PATH, or '-' "
                         "for standard input")
    return texts


def _decode_text(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{source} is not valid UTF-8: byte 0x{data[error.start]:02x} at offset "
            f"{error.start} ({error.reason}); convert it to UTF-8, e.g. with "
            "'iconv -f latin1 -t utf-8'"
        ) from None
    return text.removesuffix("\n").removesuffix("\r")


def cmd_classify(args) -> int:
    from cipherprompt.secure.client import PrivateClassifier
    from cipherprompt.secure.cost import format_cost_table, write_cost

    texts = _read_texts(args)
    with PrivateClassifier(args.server, work_dir=args.work_dir / "client",
                           expected_plan=args.plan, expected_model=args.model,
                           expected_weights_sha256=args.model_sha256,
                           tls=_tls_files(args, need_certificate=True),
                           link_timeout_s=args.link_timeout) as client:
        for index, text in enumerate(texts):
            prediction = client.classify(text, truncate=args.truncate,
                                         progress=_stage_progress(client))
            probabilities = ", ".join(
                f"{name} {p:.3f}" for name, p in zip(client.label_names,
                                                     prediction.probabilities)
            )
            print(f"{prediction.label_name}  ({probabilities})")
            print(format_cost_table(prediction.cost))
            if args.json is not None:
                path = args.json if len(texts) == 1 else args.json.with_name(
                    f"{args.json.stem}-{index}{args.json.suffix}")
                write_cost(path, prediction.cost, {
                    "label": prediction.label_name,
                    "probabilities": prediction.probabilities.tolist(),
                    "num_tokens": prediction.num_tokens,
                    "bucket": prediction.bucket,
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
    import json

    from cipherprompt.secure.launch import check_health

    status = check_health(args.server, timeout_s=args.timeout,
                          tls=_tls_files(args, need_certificate=False))
    if args.json:
        print(json.dumps(status))
    else:
        print(" ".join(f"{key}={value}" for key, value in status.items()
                       if not isinstance(value, (list, dict))))
    return 0 if status.get("status") == "serving" else 1


def cmd_make_certs(args) -> int:
    from cipherprompt.secure.tls import make_certificates

    hosts = tuple(args.host or ("localhost", "127.0.0.1"))
    written = make_certificates(args.out, hosts=hosts, days=args.days, force=args.force)
    print("wrote " + ", ".join(str(path) for path in written))
    print(f"server: cipherprompt serve --tls-ca {args.out / 'ca.crt'} --tls-cert "
          f"{args.out / 'server.crt'} --tls-key {args.out / 'server.key'} ...")
    print(f"client: cipherprompt classify --tls-ca {args.out / 'ca.crt'} --tls-cert "
          f"{args.out / 'client.crt'} --tls-key {args.out / 'client.key'} ...")
    return 0


def cmd_demo(args) -> int:
    from cipherprompt.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(work_dir=args.work_dir, sentences=args.sentences,
                               port=args.port, epochs=args.epochs))


def add_work_dir_option(sub) -> None:
    sub.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                     help="folder for every output of the run (default: %(default)s)")


def add_tls_options(sub, certificate_help: str | None) -> None:
    sub.add_argument("--tls-ca", type=Path, default=None,
                     help="PEM CA certificate that signs the peer's certificate; turns on TLS")
    if certificate_help is not None:
        sub.add_argument("--tls-cert", type=Path, default=None,
                         help=f"PEM certificate of this {certificate_help}")
        sub.add_argument("--tls-key", type=Path, default=None,
                         help="PEM private key of --tls-cert")


def _two_party_protocol(value: str) -> str:
    """Return the --protocol value; raise ArgumentTypeError for REF2K or an unknown name."""
    from cipherprompt.secure.engine import check_two_party_protocol

    try:
        check_two_party_protocol(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_server_options(serve, buckets_help: str) -> None:
    """Add the options that ``serve`` and ``serve-decoder`` share."""
    add_work_dir_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=7870, help="TCP port (default: %(default)s)")
    serve.add_argument("--buckets", default=None, help=buckets_help)
    serve.add_argument("--max-sessions", type=int, default=1,
                       help="sessions at once; more clients get 'busy' (default: %(default)s)")
    serve.add_argument("--idle-timeout", type=float, default=600.0,
                       help="seconds a session may wait for the client's next request "
                            "(default: %(default)s)")
    serve.add_argument("--link-timeout", type=float, default=600.0,
                       help="seconds one step on SPU's link may wait for the client before the "
                            "session fails (default: %(default)s)")
    serve.add_argument("--handshake-timeout", type=float, default=600.0,
                       help="seconds a new client may take to complete the handshake, which "
                            "includes compiling the programs on its side (default: "
                            "%(default)s)")
    serve.add_argument("--shutdown-grace", type=float, default=60.0,
                       help="seconds running queries may take to finish after SIGTERM "
                            "(default: %(default)s)")
    serve.add_argument("--log-json", action="store_true",
                       help="write log lines as JSON objects, one per line")
    serve.add_argument("--protocol", default="CHEETAH", type=_two_party_protocol,
                       metavar="{CHEETAH,SEMI2K}",
                       help="SPU protocol between server and client. SEMI2K makes this server "
                            "SPU's trusted first party, which could recover the client's "
                            "inputs, so it suits tests only. REF2K works only in one "
                            "process, as in 'cipherprompt evaluate' and 'cipherprompt "
                            "perplexity' (default: %(default)s)")
    add_tls_options(serve, "server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cipherprompt",
        description="Private inference of transformer models: the client's text and the "
                    "server's weights stay private (SPU CHEETAH two-party computation).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)


    demo = commands.add_parser("demo", help="train (once), serve and classify real sentences")
    add_work_dir_option(demo)
    demo.add_argument("--sentences", type=int, default=4,
                      help="test sentences to classify privately (default: %(default)s)")
    demo.add_argument("--port", type=int, default=0,
                      help="server port on 127.0.0.1; 0 picks a free one (default)")
    demo.add_argument("--epochs", type=int, default=2,
                      help="teacher epochs when no cached teacher exists (default: %(default)s)")
    demo.set_defaults(handler=cmd_demo)

    train = commands.add_parser("train", help="fine-tune the exact-operator teacher")
    add_work_dir_option(train)
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
    add_work_dir_option(baseline)
    baseline.add_argument("--seed", type=int, default=0, help="split seed")
    baseline.set_defaults(handler=cmd_baseline)

    from cipherprompt.train.distill import add_parser as add_distill_parser

    add_distill_parser(commands)

    from cipherprompt.evaluate import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)

    from cipherprompt.decoder_checkpoint import add_parser as add_import_decoder_parser
    from cipherprompt.perplexity import add_parser as add_perplexity_parser
    from cipherprompt.train.decoder_distill import add_parser as add_distill_decoder_parser

    add_import_decoder_parser(commands)
    add_distill_decoder_parser(commands)
    add_perplexity_parser(commands)


    serve = commands.add_parser("serve", help="run the server role for a checkpoint")
    add_server_options(serve, "sequence lengths in tokens, comma-separated, e.g. 16,32,64: one "
                              "program each; clients pad to the smallest that fits")
    serve.add_argument("--checkpoint", type=Path,
                       default=DEFAULT_WORK_DIR / "teacher" / "teacher.npz",
                       help="checkpoint to serve (default: %(default)s)")
    serve.add_argument("--max-len", type=int, default=None,
                       help="one sequence length in tokens (default: the checkpoint's); "
                            "same as --buckets N")
    serve.add_argument("--batch", type=int, default=1,
                       help="texts per query: programs are compiled for this many texts and "
                            "a client with fewer fills the rest with copies (default: "
                            "%(default)s)")
    serve.set_defaults(handler=cmd_serve)

    from cipherprompt.generation import add_parsers as add_generation_parsers

    add_generation_parsers(commands)

    classify = commands.add_parser("classify", help="classify texts privately (client role)")
    add_work_dir_option(classify)
    classify.add_argument("--server", required=True, help="server address HOST:PORT")
    classify.add_argument("--truncate", action="store_true",
                          help="truncate texts longer than the server's largest length bucket")
    classify.add_argument("--plan", default=None,
                          help="reject the session unless the server's operator plan has this "
                               "name")
    classify.add_argument("--model", default=None,
                          help="reject the session unless the server's model has this name")
    classify.add_argument("--model-sha256", default=None,
                          help="reject the session unless the server's weights have this SHA-256")
    classify.add_argument("--link-timeout", type=float, default=600.0,
                          help="seconds one step on SPU's link may wait for the server "
                               "(default: %(default)s)")
    classify.add_argument("--file", type=Path, action="append", default=None,
                          help="classify the whole UTF-8 content of this file as one text; "
                               "may be repeated")
    classify.add_argument("--json", type=Path, default=None,
                          help="write the prediction and cost of each query as JSON here")
    add_tls_options(classify, "client")
    classify.add_argument("texts", nargs="*", help="texts to classify; '-' reads standard input")
    classify.set_defaults(handler=cmd_classify)

    health = commands.add_parser("health", help="ask a server whether it is serving")
    health.add_argument("--server", required=True, help="server address HOST:PORT")
    health.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    health.add_argument("--json", action="store_true", help="print the whole status as JSON")
    add_tls_options(health, None)
    health.set_defaults(handler=cmd_health)

    certs = commands.add_parser("make-certs",
                                help="make a CA, a server and a client certificate for TLS")
    certs.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    certs.add_argument("--host", action="append", default=None,
                       help="DNS name or IP address the server certificate names; may be "
                            "repeated (default: localhost and 127.0.0.1)")
    certs.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    certs.add_argument("--force", action="store_true", help="replace existing files in --out")
    certs.set_defaults(handler=cmd_make_certs)

    from cipherprompt.bench.estimate import add_parser as add_estimate_parser

    add_estimate_parser(commands)

    from cipherprompt.bench.compare import add_parser as add_bench_parser

    add_bench_parser(commands)

    from cipherprompt.bench.profile import add_parser as add_profile_parser

    add_profile_parser(commands)
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
