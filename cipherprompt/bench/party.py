"""One party of a benchmark session, in its own process: ``python -m cipherprompt.bench.party SPEC``.

The server (rank 0) loads or generates the weights; the client (rank 1) reads the inputs. Each
compiles the same program from shapes alone, checks the peer's program hash over SPU's link,
and runs the queries. Both wait at a barrier on the link before each query, so that a query's
seconds start when both are ready. After each query the server sends its output share to the
client over the link, and the client reconstructs the output for the harness to check. That
transfer and the barrier happen outside SPU's runs and so are not in the query's cost.

``PartySpec`` is written as JSON by the harness (``runner.py``). Both parties build their
program with ``build_program``, which the harness also uses for its plaintext check.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cipherprompt.files import write_json

log = logging.getLogger(__name__)

# Scale of the random hidden states that stand in for the embedding's output when a run starts
# at a layer: about the spread of a LayerNorm output.
_HIDDEN_SCALE = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """Model of a benchmark session: architecture, operator plan, weights and stages to run."""

    # BertConfig fields of the whole model; only the first ``run_layers`` layers run.
    config: dict
    # OperatorPlan.to_dict() of the whole model.
    plan: dict
    run_layers: int
    # Run the embedding lookup; without it the first layer's input is random (hidden_input).
    embedding: bool
    # Run the classifier head after the last layer that runs.
    head: bool
    # Weights: a checkpoint, or init_params(config, seed=weights_seed) when None.
    checkpoint: str | None = None
    weights_seed: int = 0


@dataclass(frozen=True)
class PartySpec:
    rank: int
    # The link's party list for this party: its own listening address and the one it dials.
    server_link: str
    client_link: str
    model: ModelSpec
    max_len: int
    engine: dict
    queries: int
    link_timeout_s: float
    # Client: the inputs (.npz with ids and mask per query). Server: unused.
    inputs: str | None
    # Seed of this party's part of a random first-layer input (without embedding).
    hidden_seed: int
    work_dir: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PartySpec:
        data = json.loads(text)
        data["model"] = ModelSpec(**data["model"])
        return cls(**data)


def truncated(spec: ModelSpec):
    """Return (config, plan) of the part of the model that runs: its first ``run_layers``."""
    from cipherprompt.models.bert import BertConfig
    from cipherprompt.plan import OperatorPlan

    config = BertConfig.from_dict(spec.config)
    plan = OperatorPlan.from_dict(spec.plan)
    if not 1 <= spec.run_layers <= config.num_layers:
        raise ValueError(f"run_layers must be in 1..{config.num_layers}, got {spec.run_layers}")
    return (replace(config, num_layers=spec.run_layers),
            replace(plan, layers=plan.layers[: spec.run_layers]))


def load_weights(spec: ModelSpec):
    """Return the weights of the part of the model that runs (the server's side only)."""
    from cipherprompt.checkpoint import load_checkpoint
    from cipherprompt.models.bert import init_params

    config, _ = truncated(spec)
    if spec.checkpoint is None:
        return init_params(config, seed=spec.weights_seed)
    params = dict(load_checkpoint(Path(spec.checkpoint)).params)
    params["layers"] = list(params["layers"][: spec.run_layers])
    return params


def build_program(spec: ModelSpec, max_len: int, engine_fields: dict):
    """Compile the stages the session runs; return (CompiledModel, config, plan, engine)."""
    from cipherprompt.secure.engine import (
        CompiledModel,
        EngineConfig,
        compile_classifier,
        compile_hidden_input,
        program_digest,
    )

    config, plan = truncated(spec)
    engine = EngineConfig(**engine_fields)
    stages = list(compile_classifier(config, plan, max_len, engine).stages)
    if not spec.embedding:
        stages[0] = compile_hidden_input(config, max_len, engine)
    if not spec.head:
        stages = stages[:-1]
    return CompiledModel(stages, program_digest(stages, plan, engine)), config, plan, engine


def hidden_part(seed: int, query: int, max_len: int, hidden_size: int) -> np.ndarray:
    """Return one party's part of the random first-layer input of query number ``query``."""
    rng = np.random.default_rng([seed, query])
    return (rng.standard_normal((1, max_len, hidden_size)) * _HIDDEN_SCALE).astype(np.float32)


def _peak_rss_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _exchange_digests(party, digest: str) -> None:
    """Compare program hashes over the link; raise RuntimeError on a difference."""
    from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK

    if party.rank == CLIENT_RANK:
        party.link.send(SERVER_RANK, digest.encode())
        verdict = party.link.recv(SERVER_RANK).decode()
    else:
        peer = party.link.recv(CLIENT_RANK).decode()
        verdict = "ok" if peer == digest else f"program differs: server {digest}, client {peer}"
        party.link.send(CLIENT_RANK, verdict.encode())
    if verdict != "ok":
        raise RuntimeError(verdict)


def _send_share(party, program) -> None:
    from cipherprompt.secure.engine import CLIENT_RANK
    from cipherprompt.secure.party import share_to_blobs

    blobs = share_to_blobs(party.output_share(program))
    party.link.send(CLIENT_RANK, str(len(blobs)).encode())
    for blob in blobs:
        party.link.send(CLIENT_RANK, blob)


def _receive_output(party, program) -> np.ndarray:
    from cipherprompt.secure.engine import SERVER_RANK
    from cipherprompt.secure.party import share_from_blobs

    count = int(party.link.recv(SERVER_RANK).decode())
    blobs = [party.link.recv(SERVER_RANK) for _ in range(count)]
    return party.reconstruct(party.output_share(program), share_from_blobs(blobs))


def _client_input_shape(name: str, max_len: int, config) -> tuple[int, ...]:
    from cipherprompt.secure.engine import HIDDEN_CLIENT_PART

    return {"onehot": (1, max_len, config.vocab_size),
            HIDDEN_CLIENT_PART: (1, max_len, config.hidden_size)}.get(name, (1, max_len))


def _client_input(name: str, inputs, query: int, spec: PartySpec, config) -> np.ndarray:
    """Return the client's value of input ``name`` for query number ``query``."""
    from cipherprompt.models.bert import one_hot, pooling_weights
    from cipherprompt.secure.engine import HIDDEN_CLIENT_PART

    mask = inputs["mask"][query][None, :].astype(np.float32)
    if name == "onehot":
        return one_hot(inputs["ids"][query][None, :], config.vocab_size)
    if name == "mask":
        return mask
    if name == "pool":
        return pooling_weights(mask)
    if name == HIDDEN_CLIENT_PART:
        return hidden_part(spec.hidden_seed, query, spec.max_len, config.hidden_size)
    raise ValueError(f"the program asks for client input {name!r}, which the bench does not make")


def run_party(spec: PartySpec) -> dict:
    """Run one party's side of the session; return its record (costs, set-up, memory)."""
    from cipherprompt.models.bert import init_params
    from cipherprompt.secure.engine import (
        CLIENT_RANK,
        HIDDEN_SERVER_PART,
        SERVER_RANK,
        named_weights,
    )
    from cipherprompt.secure.party import LinkOptions, SecureParty

    work_dir = Path(spec.work_dir)
    started = time.perf_counter()
    program, config, _, engine = build_program(spec.model, spec.max_len, spec.engine)
    compile_seconds = time.perf_counter() - started
    is_server = spec.rank == SERVER_RANK
    if is_server:
        weights = named_weights(load_weights(spec.model))
    else:
        # The client's share of each weight is a zero placeholder of its public shape.
        weights = {name: np.zeros_like(value)
                   for name, value in named_weights(init_params(config, seed=0)).items()}
        inputs = np.load(spec.inputs)
    log.info("rank %d: program %s compiled in %.1f s; linking %s / %s", spec.rank,
             program.digest[:16], compile_seconds, spec.server_link, spec.client_link)

    started = time.perf_counter()
    party = SecureParty(spec.rank, spec.server_link, spec.client_link, engine,
                        work_dir / f"spu-rank{spec.rank}.log",
                        LinkOptions(timeout_s=spec.link_timeout_s))
    _exchange_digests(party, program.digest)
    for name, value in weights.items():
        party.set_secret(name, value, owner=SERVER_RANK)
    setup_seconds = time.perf_counter() - started

    stage_inputs = {name for stage in program.stages for name in stage.client_names}
    queries, outputs = [], []
    for query in range(spec.queries):
        for name in sorted(stage_inputs):
            if is_server:
                value = np.zeros(_client_input_shape(name, spec.max_len, config), np.float32)
            else:
                value = _client_input(name, inputs, query, spec, config)
            party.set_secret(name, value, owner=CLIENT_RANK)
        if any(HIDDEN_SERVER_PART in stage.param_names for stage in program.stages):
            server_part = (hidden_part(spec.hidden_seed, query, spec.max_len, config.hidden_size)
                           if is_server else
                           np.zeros((1, spec.max_len, config.hidden_size), np.float32))
            party.set_secret(HIDDEN_SERVER_PART, server_part, owner=SERVER_RANK)

        party.link.barrier()
        cost = party.run(program)
        queries.append(cost.to_dict())
        if is_server:
            _send_share(party, program)
        else:
            outputs.append(_receive_output(party, program))
        log.info("rank %d: query %d/%d took %.1f s", spec.rank, query + 1, spec.queries,
                 cost.wall_seconds)

    party.close()
    record = {
        "rank": spec.rank,
        "program_sha256": program.digest,
        "stages": [stage.name for stage in program.stages],
        "compile_seconds": compile_seconds,
        "setup_seconds": setup_seconds,
        "queries": queries,
        "peak_rss_kib": _peak_rss_kib(),
    }
    if outputs:
        np.save(work_dir / "outputs.npy", np.concatenate(outputs, axis=0))
        record["outputs"] = str(work_dir / "outputs.npy")
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m cipherprompt.bench.party SPEC.json RESULT.json", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = PartySpec.from_json(Path(argv[0]).read_text())
    record = run_party(spec)
    write_json(Path(argv[1]), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
