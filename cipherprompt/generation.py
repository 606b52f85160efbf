"""Commands for private text generation: ``serve-decoder`` and ``generate``, and cost reports.

``generate`` streams the new tokens to standard output as they are chosen and writes progress
and costs to standard error. ``--report PATH`` writes the costs as JSON: the prompt phase and
every step separately, their means per token, and the peak memory (VmHWM) of the client process
and of the server's session process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cipherprompt.files import write_json

log = logging.getLogger(__name__)


# -- the report ------------------------------------------------------------------------------


def _mean(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def generation_report(generation, client, sampling, recompute: bool) -> dict:
    """Describe a finished generation's costs as a JSON-ready dict (no token ids, no text)."""
    from cipherprompt.secure.worker import peak_memory_kib

    runs = [run.to_dict() for run in generation.runs]
    prompt_phase, per_token = runs[0], runs[1:]
    server_peaks = [run["server_peak_memory_kib"] for run in runs]
    return {
        "model": client.description.get("model"),
        "plan": client.plan.name,
        "protocol": client.engine.protocol,
        "mode": "recompute" if recompute else "cache",
        "prompt_tokens": generation.prompt_tokens,
        "prompt_bucket": generation.bucket,
        "cache_capacity": client.programs.capacity,
        "new_tokens": len(generation.token_ids),
        "stop_reason": generation.stop_reason,
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                     "seed": sampling.seed},
        "prompt_phase": prompt_phase,
        "steps": per_token,
        "per_token_mean": {
            "count": len(per_token),
            "wall_seconds": _mean([run["wall_seconds"] for run in per_token]),
            "spu_seconds": _mean([run["spu_seconds"] for run in per_token]),
            "server_seconds": _mean([run["server_seconds"] for run in per_token]),
            "bytes": _mean([run["bytes_sent"] + run["bytes_received"] for run in per_token]),
            "messages": _mean([run["messages"] for run in per_token]),
        },
        "memory": {
            "client_peak_kib": peak_memory_kib(),
            "server_session_peak_kib": max((peak for peak in server_peaks if peak is not None),
                                           default=None),
        },
    }




def format_summary(report: dict) -> str:
    """Return two lines: the prompt phase's cost, and the mean cost of each later token."""
    from cipherprompt.secure.cost import format_bytes

    prompt = report["prompt_phase"]
    lines = [f"prompt ({report['prompt_bucket']}-token bucket): {prompt['wall_seconds']:.2f} s, "
             f"{format_bytes(prompt['bytes_sent'] + prompt['bytes_received'])}, "
             f"{prompt['messages']} messages"]
    mean = report["per_token_mean"]
    if mean["count"]:
        kind = "recomputed prefix" if report["mode"] == "recompute" else "cached step"
        lines.append(f"per token after the first ({mean['count']}, {kind}): "
                     f"{mean['wall_seconds']:.2f} s, {format_bytes(mean['bytes'])}, "
                     f"{mean['messages']:.0f} messages")
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------------------


def cmd_serve_decoder(args) -> int:
    from cipherprompt.cli import run_server, server_config
    from cipherprompt.secure.decoder_server import DecoderServer, DecoderSource
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.secure.logs import use_formatter

    use_formatter(args.log_json)
    gguf = args.gguf
    if gguf is None and args.checkpoint is None:
        from cipherprompt.assets import asset_path

        gguf = asset_path("smollm2_gguf")
    source = DecoderSource(gguf=gguf, checkpoint=args.checkpoint, plan=args.plan,
                           num_layers=args.num_layers)
    server = DecoderServer(source, server_config(args), EngineConfig(protocol=args.protocol),
                           max_new_tokens=args.max_new_tokens)
    return run_server(server)


def _read_prompt(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"standard input is not valid UTF-8 ({error.reason} at byte "
                         f"{error.start}); convert it to UTF-8") from None


class _TokenPrinter:
    """Print each new token's text as soon as it forms whole UTF-8 characters."""

    def __init__(self, tokenizer, stream):
        self.tokenizer = tokenizer
        self.stream = stream
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A byte-level token may end inside a character; wait for the rest of its bytes.
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[self.printed:])
        self.stream.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.stream.write(text[self.printed:] + "\n")
        self.stream.flush()


def cmd_generate(args) -> int:
    from cipherprompt.cli import _tls_files
    from cipherprompt.sampling import SamplingConfig
    from cipherprompt.secure.generator import PrivateGenerator
    from cipherprompt.tokenizer import EmptyTextError

    prompt = _read_prompt(args.prompt)
    if not prompt.strip():
        # Checked before connecting, which compiles the programs and sets up the runtime.
        raise EmptyTextError("the prompt is empty; pass the text to continue")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    with PrivateGenerator(args.server, tokenizer_path=args.tokenizer,
                          work_dir=args.work_dir / "client", expected_plan=args.plan,
                          expected_model=args.model, expected_weights_sha256=args.model_sha256,
                          tls=_tls_files(args, need_certificate=True),
                          link_timeout_s=args.link_timeout) as client:
        prompt_ids = client.encode_prompt(prompt, chat=not args.no_chat)
        max_new_tokens = args.max_new_tokens or client.max_new_tokens
        printer = _TokenPrinter(client.tokenizer, sys.stdout)
        generation = client.generate(prompt_ids, max_new_tokens, sampling, on_token=printer,
                                     recompute=args.recompute, hide_length=args.hide_length)
        printer.finish()
        report = generation_report(generation, client, sampling, args.recompute)
    print(format_summary(report), file=sys.stderr)
    if args.report is not None:
        write_json(args.report, report)
        print(f"report: {args.report}", file=sys.stderr)
    return 0


def add_parsers(commands) -> None:
    """Add ``serve-decoder`` and ``generate`` to the CLI's subcommands."""
    from cipherprompt.cli import add_server_options, add_tls_options, add_work_dir_option
    from cipherprompt.secure.decoder_server import DEFAULT_DECODER_BUCKETS, DEFAULT_MAX_NEW_TOKENS

    serve = commands.add_parser(
        "serve-decoder", help="serve private text generation with a decoder (server role)",
        description="Serve private text generation: the weights stay with this server, the "
                    "prompt and the generated tokens with the client.")
    add_server_options(serve, "prompt lengths in tokens, comma-separated, e.g. 32,64: one "
                              "prompt program each; clients pad to the smallest that fits "
                              f"(default: {','.join(map(str, DEFAULT_DECODER_BUCKETS))})")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file of a Llama-family decoder (default: the packaged "
                             "SmolLM2-135M-Instruct)")
    source.add_argument("--checkpoint", type=Path, default=None,
                        help="cipherprompt checkpoint of a Llama-family decoder")
    serve.add_argument("--plan", default="decoder-exact",
                       help="operator plan preset for --gguf (default: %(default)s)")
    serve.add_argument("--num-layers", type=int, default=None,
                       help="serve only the first N layers, to measure costs (default: all)")
    serve.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help="new tokens a generation may have after the largest prompt bucket; "
                            "sets the key/value cache's size (default: %(default)s)")
    serve.set_defaults(handler=cmd_serve_decoder)

    generate = commands.add_parser(
        "generate", help="continue a prompt privately (client role)",
        description="Generate text after a prompt, privately: the server never sees the "
                    "prompt or the new tokens. Tokens print as they are chosen; costs go to "
                    "standard error.")
    add_work_dir_option(generate)
    generate.add_argument("--server", required=True, help="server address HOST:PORT")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help="stop after this many new tokens (default: the most the "
                               "server's cache allows)")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 chooses the most likely token; above 0 samples "
                               "(default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=None,
                          help="sample among the K most likely tokens; needs --temperature")
    generate.add_argument("--seed", type=int, default=None,
                          help="seed of the sampler, to repeat a sampled continuation")
    generate.add_argument("--no-chat", action="store_true",
                          help="send the prompt as it is, without the model's chat template")
    generate.add_argument("--hide-length", action="store_true",
                          help="run all --max-new-tokens steps even after the end of the "
                               "answer, so the server does not learn the answer's length")
    generate.add_argument("--recompute", action="store_true",
                          help="rerun the whole prefix for every token instead of the "
                               "key/value cache, to measure what the cache saves")
    generate.add_argument("--report", type=Path, default=None,
                          help="write per-token time, traffic and peak memory as JSON here")
    generate.add_argument("--tokenizer", type=Path, default=None,
                          help="GGUF file with the server model's tokenizer (default: the "
                               "packaged SmolLM2 file)")
    generate.add_argument("--plan", default=None,
                          help="reject the session unless the server's operator plan has this "
                               "name")
    generate.add_argument("--model", default=None,
                          help="reject the session unless the server's model has this name")
    generate.add_argument("--model-sha256", default=None,
                          help="reject the session unless the server's weights have this SHA-256")
    generate.add_argument("--link-timeout", type=float, default=600.0,
                          help="seconds one step on SPU's link may wait for the server "
                               "(default: %(default)s)")
    add_tls_options(generate, "client")
    generate.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    generate.set_defaults(handler=cmd_generate)
