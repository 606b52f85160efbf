"""``cipherprompt profile``: where one private query spends its time and traffic.

One query of a classifier (a checkpoint, or random weights of a named shape) runs between a
server party and a client party, two processes joined by SPU's link on 127.0.0.1 under
CHEETAH. Its cost is attributed by the named scopes of the one model definition
(``cipherprompt/models/bert.py``): per block (embedding, each layer, head) and per operator kind
(embedding, linear, attention_products, attention_normaliser, activation, layer_normaliser,
head).

SPU 0.9.5 profiles a program per SPU operation (``dot``, ``tanh``, ...), not per scope. So the
profiler compiles every step of the model as its own program (``compile_classifier_steps``)
and reads the link statistics of each. Intermediate secrets stay inside the runtime between
programs, as they do between the stages of a normal query. SPU cannot optimise across a program
boundary, so the profile also runs the normal staged query and reports its totals next to the
sum of the steps: their difference is the cost of the attribution itself.

One session runs three queries on the same inputs. The first (the normal staged program) is a
warm-up: it pays one-time costs that later queries do not, such as OT and HE set-up. In a test
with a tiny model its embedding product moved 19.5 MB against 1.5 MB in later queries. Its
totals are reported apart. Then the normal staged query and the query by steps follow.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cipherprompt.bench.estimate import MODEL_PRESETS
from cipherprompt.bench.machine import load_now, machine_facts
from cipherprompt.bench.profile_report import (
    attribute,
    difference,
    format_table,
    group_rows,
    query_total,
    write_report,
)
from cipherprompt.models.bert import BertConfig

log = logging.getLogger(__name__)

SPU_LOG_DIR = "spu-logs"
DEFAULT_SEQ_LEN = 32
MIN_SEQ_LEN = 3  # [CLS], one token and [SEP]

# The tiny shape keeps the real vocabulary, so that --text works with the packaged tokenizer.
TINY = BertConfig(vocab_size=30522, hidden_size=24, num_layers=2, num_heads=3,
                  intermediate_size=40, max_positions=64)


def model_shapes() -> dict[str, BertConfig]:
    """Return the named shapes for random weights: ``tiny`` and the encoder presets."""
    shapes = {"tiny": TINY}
    for name, shape in MODEL_PRESETS.items():
        if shape.gated_ffn or shape.kv_heads != shape.heads:
            continue  # a decoder shape; the profiler runs the BERT classifier
        shapes[name] = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                  num_layers=shape.layers, num_heads=shape.heads,
                                  intermediate_size=shape.ffn)
    return shapes


@dataclass(frozen=True)
class ProfileConfig:
    """Inputs of one profile run. Every output goes under ``out_dir``."""

    out_dir: Path
    # Exactly one of checkpoint (a .npz from train or distill) and model (a named shape).
    checkpoint: Path | None = None
    model: str | None = None
    # Operator plan preset; None takes the checkpoint's plan, or exact for random weights.
    plan: str | None = None
    # Tokens per query; None takes the checkpoint's serving length, or 32.
    seq_len: int | None = None
    # Text to tokenize as the query; None draws random token ids. Costs do not depend on it.
    text: str | None = None
    # Seed of the random weights and token ids.
    seed: int = 0
    # Run a warm-up query first, so that one-time set-up costs stay out of the profile.
    warm_up: bool = True
    # Seconds one protocol step may wait for the other party.
    link_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("pass exactly one of --checkpoint PATH and --model NAME "
                             f"({', '.join(model_shapes())})")
        if self.model is not None and self.model not in model_shapes():
            raise ValueError(f"unknown model shape {self.model!r}; valid choices: "
                             f"{', '.join(model_shapes())}, or pass --checkpoint PATH")
        if self.link_timeout_s <= 0:
            raise ValueError(f"the link timeout must be positive, got {self.link_timeout_s} s")


@dataclass
class ResolvedModel:
    config: BertConfig
    params: dict
    plan: object  # OperatorPlan
    seq_len: int
    source: str


def resolve_model(cfg: ProfileConfig) -> ResolvedModel:
    """Load the checkpoint or draw random weights, and check the plan and the sequence length."""
    from cipherprompt.models.bert import check_encoder_plan, init_params
    from cipherprompt.plan import OperatorPlan

    if cfg.checkpoint is not None:
        from cipherprompt.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(cfg.checkpoint)
        config, params, plan = checkpoint.config, checkpoint.params, checkpoint.plan
        seq_len = cfg.seq_len if cfg.seq_len is not None else checkpoint.max_len
        source = f"checkpoint {cfg.checkpoint}"
        if cfg.plan is not None and cfg.plan != plan.name:
            log.warning("the checkpoint was trained with plan %r; profiling it with plan %r. "
                        "Costs do not depend on the weights, but its outputs mean little",
                        plan.name, cfg.plan)
            plan = OperatorPlan.preset(cfg.plan, config.num_layers)
    else:
        config = model_shapes()[cfg.model]
        params = init_params(config, seed=cfg.seed)
        plan = OperatorPlan.preset(cfg.plan or "exact", config.num_layers)
        seq_len = cfg.seq_len if cfg.seq_len is not None else min(DEFAULT_SEQ_LEN,
                                                                  config.max_positions)
        source = f"random weights of shape {cfg.model} (seed {cfg.seed})"
    check_encoder_plan(config, plan)
    if not MIN_SEQ_LEN <= seq_len <= config.max_positions:
        raise ValueError(
            f"--seq-len {seq_len} is outside {MIN_SEQ_LEN}..{config.max_positions}: the model "
            f"has {config.max_positions} positions; choose --seq-len in that range"
        )
    return ResolvedModel(config, params, plan, seq_len, source)


def query_tokens(cfg: ProfileConfig, model: ResolvedModel) -> tuple[np.ndarray, np.ndarray]:
    """Return the query's token ids and mask [1, seq_len]: the text's, or random ids."""
    if cfg.text is None:
        rng = np.random.default_rng(cfg.seed)
        ids = rng.integers(0, model.config.vocab_size, size=(1, model.seq_len))
        return ids, np.ones((1, model.seq_len), np.float32)
    from cipherprompt.tokenizer import WordPieceTokenizer

    tokenizer = WordPieceTokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"--text needs a model with the tokenizer's {tokenizer.vocab_size} tokens, but the "
            f"model's vocabulary has {model.config.vocab_size} tokens; leave out --text to use "
            "random token ids"
        )
    encoded = tokenizer.encode(cfg.text, model.seq_len)
    return encoded.ids[None, :], encoded.mask[None, :]


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and a probe file in it; raise OSError naming the folder on failure."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise OSError(error.errno, f"cannot write the report into {out_dir} "
                                   f"({error.strerror}); choose a writable folder with --out") from None


# -- the run ----------------------------------------------------------------------------------


def _stage_progress(label: str, total: int):
    from tqdm import tqdm

    from cipherprompt.train.teacher import progress_interval

    bar = tqdm(total=total, desc=label, unit="stage", mininterval=progress_interval())

    def report(index: int, count: int, name: str) -> None:
        bar.update(index - bar.n)
        bar.set_postfix_str(name, refresh=False)

    return bar, report


def profile_query(cfg: ProfileConfig, command: str = "") -> dict:
    """Run the profile of ``cfg`` and return the report (what ``write_report`` writes)."""
    from cipherprompt.models.bert import classifier_blocks, classify, one_hot, pooling_weights
    from cipherprompt.secure.engine import (
        CLIENT_RANK,
        SERVER_RANK,
        EngineConfig,
        compile_classifier,
        compile_classifier_steps,
        named_weights,
    )
    from cipherprompt.secure.pair import PartyPair

    check_writable(cfg.out_dir)
    model = resolve_model(cfg)
    ids, mask = query_tokens(cfg, model)
    engine = EngineConfig()
    machine = {**machine_facts(), **load_now()}
    blocks = classifier_blocks(model.config, model.plan)

    log.info("compiling the staged program and the program by steps (%s, plan %s, %d tokens)",
             model.source, model.plan.name, model.seq_len)
    started = time.perf_counter()
    programs = {
        "fused": compile_classifier(model.config, model.plan, model.seq_len, engine),
        "steps": compile_classifier_steps(model.config, model.plan, model.seq_len, engine),
    }
    compile_seconds = time.perf_counter() - started
    plaintext = np.asarray(classify(model.params, model.config, model.plan, ids, mask,
                                    pooling_weights(mask)))[0]
    client_inputs = {"onehot": one_hot(ids, model.config.vocab_size), "mask": mask,
                     "pool": pooling_weights(mask)}

    log.info("starting the server and client parties on 127.0.0.1 (SPU logs in %s)",
             cfg.out_dir / SPU_LOG_DIR)
    runs = [("warm-up", "fused")] if cfg.warm_up else []
    runs += [("fused", "fused"), ("steps", "steps")]
    costs, logits = {}, {}
    with PartyPair(programs, engine, cfg.out_dir / SPU_LOG_DIR, cfg.link_timeout_s) as pair:
        log.info("parties ready in %.1f s", pair.setup_seconds)
        pair.set_secrets(named_weights(model.params), SERVER_RANK)
        for label, key in runs:
            # Each query infeeds its inputs afresh, as a client does.
            pair.set_secrets(client_inputs, CLIENT_RANK)
            bar, report = _stage_progress(label, len(programs[key].stages))
            with bar:
                costs[label] = pair.run(key, on_stage=report)
                bar.update(bar.total - bar.n)
            logits[label] = pair.reveal("logits")[0]
            pair.delete(["logits"])
            total = query_total(costs[label].client, label)
            log.info("%s query: %.1f s, %.1f MB sent, %.1f MB received, %d messages", label,
                     total.seconds, total.bytes_sent / 1e6, total.bytes_received / 1e6,
                     total.messages)
        setup_seconds = pair.setup_seconds

    return build_report(cfg, model, blocks, costs, logits, plaintext, machine, compile_seconds,
                        setup_seconds, command)


def build_report(cfg: ProfileConfig, model: ResolvedModel, blocks, costs: dict, logits: dict,
                 plaintext: np.ndarray, machine: dict, compile_seconds: float,
                 setup_seconds: float, command: str) -> dict:
    """Assemble the report from the runs' costs (each a PairCost) and outputs."""
    from cipherprompt.secure.engine import EngineConfig

    steps_cost = costs["steps"].client
    rows = attribute(steps_cost, blocks)
    steps_total = query_total(steps_cost, "steps")
    fused_total = query_total(costs["fused"].client, "fused")
    step_details = []
    for stage in steps_cost.stages:
        block, step = stage.stage.split("/", 1)
        detail = asdict(stage)
        detail.update(block=block, step=step)
        step_details.append(detail)
    report = {
        "command": command,
        "config": {
            "source": model.source,
            "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
            "model": cfg.model,
            "architecture": model.config.to_dict(),
            "plan": model.plan.to_dict(),
            "seq_len": model.seq_len,
            "query": "text" if cfg.text is not None else f"random token ids (seed {cfg.seed})",
            "engine": EngineConfig().to_dict(),
            "warm_up": cfg.warm_up,
        },
        "machine": machine,
        "load_after": load_now(),
        "view": "client: bytes_sent goes from client to server, bytes_received back",
        "compile_seconds": compile_seconds,
        "session_setup_seconds": setup_seconds,
        "total": steps_total.to_dict(),
        "rows": [row.to_dict(steps_total) for row in rows],
        "by_operator": [row.to_dict(steps_total) for row in group_rows(rows, "operator")],
        "by_block": [row.to_dict(steps_total) for row in group_rows(rows, "block")],
        "fused": fused_total.to_dict(),
        "attribution_overhead": difference(steps_total, fused_total),
        "server_view": {"bytes_sent": costs["steps"].server.bytes_sent,
                        "bytes_received": costs["steps"].server.bytes_received},
        "max_abs_logit_error": {label: float(np.abs(value - plaintext).max())
                                for label, value in logits.items()},
        "steps": step_details,
    }
    if "warm-up" in costs:
        report["warm_up"] = query_total(costs["warm-up"].client, "warm-up").to_dict()
    return report


# -- command line -----------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``profile`` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "profile", help="cost of one private query per layer and operator kind",
        description="Run one private query between a server and a client process (CHEETAH, "
                    "127.0.0.1) and attribute its seconds, bytes and messages to each layer and "
                    "operator kind. Writes profile.json, profile.csv and profile.png.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint (.npz) to profile")
    source.add_argument("--model", help="profile random weights of this shape: "
                                        f"{', '.join(model_shapes())}")
    parser.add_argument("--plan", default=None,
                        help="operator plan preset (exact, reference, friendly, "
                             "friendly-first-K, PRESET+KIND=NAME such as "
                             "exact+activation=relu); default: the checkpoint's plan, or exact")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per query; default: the checkpoint's serving length, or "
                             f"{DEFAULT_SEQ_LEN}")
    parser.add_argument("--text", default=None,
                        help="text of the query (default: random token ids; costs do not "
                             "depend on the text)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random weights and token ids (default: %(default)s)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="skip the warm-up query; one-time set-up costs then land in the "
                             "normal staged query")
    parser.add_argument("--link-timeout", type=float, default=600.0,
                        help="seconds one protocol step may wait for the other party "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("cipherprompt-work/profile"),
                        help="folder for the report (default: %(default)s)")
    parser.set_defaults(handler=cmd_profile)
    return parser


def cmd_profile(args) -> int:
    """Handler of ``cipherprompt profile``: validate, run the query, print and write."""
    cfg = ProfileConfig(out_dir=args.out, checkpoint=args.checkpoint, model=args.model,
                        plan=args.plan, seq_len=args.seq_len, text=args.text, seed=args.seed,
                        warm_up=args.warm_up, link_timeout_s=args.link_timeout)
    command = shlex.join(["cipherprompt", *sys.argv[1:]])
    report = profile_query(cfg, command)
    paths = write_report(report, cfg.out_dir)
    print(format_table(report))
    print("report: " + ", ".join(str(path) for path in paths))
    return 0
