"""Measure private generation with the key/value cache against recomputing the prefix.

Starts ``cipherprompt serve-decoder`` on 127.0.0.1, then runs ``cipherprompt generate`` once
per mode, each in its own client process so that each peak memory is its own:

- ``cache``: the prompt program once, then one step program per token on the secret cache;
- ``recompute``: the prompt program again on the whole prefix for every token.

Writes one JSON file with both reports, which give the prompt phase and every step separately
with seconds, bytes and messages. It adds the peak memory (VmHWM) of each client process, of
the server's session process and of the server process, and the per-token ratio of the modes.

``--reference-layers N`` instead checks the fixed-point precision in this process: it runs the
first N layers of the model under SPU's REF2K protocol and compares every run's logits with
float32 plaintext of the same layers.

Example, SmolLM2-135M-Instruct with its chat template (see docs/generation.md):

    python benchmarks/generation.py --buckets 48 --max-new-tokens 8 \\
        --prompt "What is the capital of France?" --out generation-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))


def _run_generate(address: str, mode: str, args, work_dir: Path) -> dict:
    report_path = work_dir / f"report-{mode}.json"
    new_tokens = args.max_new_tokens
    if mode == "recompute" and args.recompute_tokens is not None:
        new_tokens = args.recompute_tokens
    command = [sys.executable, "-m", "cipherprompt", "generate", "--server", address,
               "--max-new-tokens", str(new_tokens), "--report", str(report_path),
               "--work-dir", str(work_dir / mode)]
    if args.no_chat:
        command.append("--no-chat")
    if args.tokenizer is not None:
        command += ["--tokenizer", str(args.tokenizer)]
    if mode == "recompute":
        command.append("--recompute")
    started = time.monotonic()
    result = subprocess.run([*command, args.prompt], capture_output=True, text=True,
                            cwd=REPOSITORY)
    if result.returncode != 0:
        raise RuntimeError(f"generate --{mode} failed with status {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    report = json.loads(report_path.read_text())
    report["client_wall_seconds"] = time.monotonic() - started
    # The streamed continuation without the prompt. The file stores it next to the plaintext
    # greedy continuation of the same weights, because the benchmark's prompt is public.
    report["_text"] = result.stdout.rstrip("\n")
    for line in result.stderr.splitlines():
        if line.startswith(("prompt (", "per token")):
            print(f"{mode}: {line}", file=sys.stderr)
    return report


def plaintext_continuation(args, model: Path, model_option: str) -> dict:
    """Generate greedily in float32 plaintext from the same weights, plan and prompt."""
    from cipherprompt.llama_tokenizer import LlamaTokenizer
    from cipherprompt.models.llama import generate_greedy
    from cipherprompt.secure.decoder_server import DecoderSource, load_decoder

    source = (DecoderSource(checkpoint=model, num_layers=args.num_layers)
              if model_option == "--checkpoint"
              else DecoderSource(gguf=model, num_layers=args.num_layers))
    decoder = load_decoder(source)
    tokenizer = LlamaTokenizer(args.tokenizer or (model if model_option == "--gguf" else None)
                               or _packaged_gguf())
    text = args.prompt if args.no_chat else tokenizer.apply_chat_template(args.prompt)
    ids = tokenizer.encode(text)
    new_ids = generate_greedy(decoder.params, decoder.config, decoder.plan, ids,
                              args.max_new_tokens)
    if tokenizer.eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
    return {"plan": decoder.plan.name, "token_ids": new_ids,
            "text": tokenizer.decode(new_ids, skip_special_tokens=True)}


def _packaged_gguf() -> Path:
    from cipherprompt.assets import asset_path

    return asset_path("smollm2_gguf")


def measure_two_party(args) -> dict:
    from cipherprompt.secure.launch import ServerProcess
    from cipherprompt.secure.worker import peak_memory_kib

    model = args.checkpoint if args.checkpoint is not None else args.gguf
    model_option = "--checkpoint" if args.checkpoint is not None else "--gguf"
    if model is None:
        from cipherprompt.assets import asset_path

        model = asset_path("smollm2_gguf")
    server_args = ["--buckets", args.buckets, "--max-new-tokens", str(args.max_new_tokens),
                   "--protocol", args.protocol, "--idle-timeout", "1800"]
    if args.num_layers is not None:
        server_args += ["--num-layers", str(args.num_layers)]
    work_dir = Path(tempfile.mkdtemp(prefix="cipherprompt-generation-"))
    reports = {}
    with ServerProcess(model, work_dir / "server", extra_args=tuple(server_args),
                       start_timeout_s=1800, command="serve-decoder",
                       model_option=model_option) as server:
        for mode in args.modes.split(","):
            reports[mode] = _run_generate(server.address, mode, args, work_dir)
        server_peak = peak_memory_kib(server.process.pid)

    texts = {mode: report.pop("_text") for mode, report in reports.items()}
    plaintext = plaintext_continuation(args, model, model_option)
    for mode, report in reports.items():
        report["continuation"] = texts[mode]
        # The cache mode must produce the plaintext greedy text. The recompute mode may stop
        # earlier (--recompute-tokens), so it must produce the text's beginning.
        report["matches_plaintext"] = plaintext["text"].startswith(texts[mode]) and (
            mode != "cache" or texts[mode] == plaintext["text"])
    result = {
        "what": "private generation, key/value cache against recomputing the prefix",
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "server": {"model": str(model), "buckets": args.buckets,
                   "max_new_tokens": args.max_new_tokens, "protocol": args.protocol,
                   "num_layers": args.num_layers, "process_peak_kib": server_peak},
        "modes": reports,
        "plaintext": plaintext,
        # Whether the shorter text is the start of the longer one, when the modes' token
        # counts differ (--recompute-tokens).
        "same_text": all(max(texts.values(), key=len).startswith(text)
                         for text in texts.values()),
    }
    if {"cache", "recompute"} <= set(reports):
        cache = reports["cache"]["per_token_mean"]
        recompute = reports["recompute"]["per_token_mean"]
        result["recompute_over_cache_per_token"] = {
            key: recompute[key] / cache[key] if cache[key] else None
            for key in ("wall_seconds", "bytes", "messages")
        }
    return result


def check_reference(args) -> dict:
    """Compare REF2K logits of the first N layers with float32 plaintext, run by run."""
    import jax.numpy as jnp
    import numpy as np

    from cipherprompt.llama_tokenizer import LlamaTokenizer
    from cipherprompt.models.llama import forward
    from cipherprompt.secure.decoder import ReferenceDecoder
    from cipherprompt.secure.decoder_server import DecoderSource, load_decoder
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.secure.handshake import parse_buckets, pick_bucket

    if args.checkpoint is not None:
        raise ValueError("--reference-layers reads a GGUF file; pass --gguf or nothing")
    gguf = args.gguf
    if gguf is None:
        from cipherprompt.assets import asset_path

        gguf = asset_path("smollm2_gguf")
    decoder = load_decoder(DecoderSource(gguf=gguf, num_layers=args.reference_layers))
    tokenizer = LlamaTokenizer(args.tokenizer or gguf)
    text = args.prompt if args.no_chat else tokenizer.apply_chat_template(args.prompt)
    ids = tokenizer.encode(text)
    buckets = parse_buckets(args.buckets)
    bucket = pick_bucket(len(ids), buckets)
    if bucket is None:
        raise ValueError(f"the prompt needs {len(ids)} tokens; pass a larger --buckets")

    started = time.monotonic()
    reference = ReferenceDecoder(decoder.config, decoder.plan, decoder.params, buckets,
                                 args.max_new_tokens, EngineConfig(protocol="REF2K"))
    setup_seconds = time.monotonic() - started
    tokens, runs = [], []
    logits = reference.prompt(ids, bucket)
    for count in range(args.max_new_tokens):
        plain, _ = forward(decoder.params, decoder.config, decoder.plan,
                           jnp.asarray([ids + tokens]))
        plain = np.asarray(plain)[0, -1]
        top_two = np.sort(plain)[-2:]
        runs.append({"run": count, "max_abs_error": float(np.abs(logits - plain).max()),
                     "logit_range": float(plain.max() - plain.min()),
                     "top_two_margin": float(top_two[1] - top_two[0]),
                     "same_choice": int(np.argmax(logits)) == int(np.argmax(plain))})
        tokens.append(int(np.argmax(logits)))
        if count + 1 < args.max_new_tokens:
            logits = reference.step(tokens[-1], bucket, len(ids), count)
    return {
        "what": "REF2K fixed-point logits against float32 plaintext, first layers only",
        "command": " ".join(sys.argv),
        "model": decoder.name,
        "layers": decoder.config.num_layers,
        "prompt_tokens": len(ids),
        "bucket": bucket,
        "setup_seconds": setup_seconds,
        "seconds": time.monotonic() - started,
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None,
                        help="decoder GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="cipherprompt decoder checkpoint, in place of --gguf")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="GGUF file with the tokenizer, for --checkpoint models")
    parser.add_argument("--buckets", default="48", help="prompt buckets (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="new tokens per mode (default: %(default)s)")
    parser.add_argument("--recompute-tokens", type=int, default=None,
                        help="new tokens of the recompute mode, which costs a whole prompt run "
                             "per token (default: --max-new-tokens)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="serve only the first N layers (default: all)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--no-chat", action="store_true", help="leave out the chat template")
    parser.add_argument("--modes", default="cache,recompute",
                        help="comma-separated: cache, recompute (default: %(default)s)")
    parser.add_argument("--protocol", default="CHEETAH", choices=["CHEETAH", "SEMI2K", "REF2K"],
                        help="SPU protocol of the two-party run; REF2K works only in one "
                             "process and needs --reference-layers (default: %(default)s)")
    parser.add_argument("--reference-layers", type=int, default=None,
                        help="check REF2K precision on the first N layers in this process "
                             "instead of a two-party run")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    if args.protocol == "REF2K" and args.reference_layers is None:
        # Between two processes each REF2K party computes on its own inputs only.
        parser.error("--protocol REF2K works only in one process. Add --reference-layers N, "
                     "or choose CHEETAH or SEMI2K for the two-party run")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    if args.reference_layers is not None:
        result = check_reference(args)
    else:
        result = measure_two_party(args)
    from cipherprompt.files import write_json

    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
