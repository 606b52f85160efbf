"""SPU engine set-up: runtime configuration, program compilation and the program hash.

Rank 0 is the server (owns the weights), rank 1 the client (owns the tokens). Both parties
compile the same JAX function from shapes alone and compare the SHA-256 of the compiled
program before running it. Weights are infed as secrets owned by the server with SPU's
colocated optimisation, so the client's share is a zero placeholder and weights cost no traffic.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import jax
import numpy as np
import spu
import spu.libspu as libspu
from spu.utils import frontend

from cipherprompt.models.bert import (
    BertConfig,
    Params,
    classifier_blocks,
    classifier_head,
    embed,
    encoder_layer,
    init_params,
)
from cipherprompt.plan import OperatorPlan

log = logging.getLogger(__name__)

SERVER_RANK = 0
CLIENT_RANK = 1
WORLD_SIZE = 2

PROTOCOLS = {
    "CHEETAH": libspu.ProtocolKind.CHEETAH,
    "REF2K": libspu.ProtocolKind.REF2K,
    "SEMI2K": libspu.ProtocolKind.SEMI2K,
}
FIELDS = {"FM64": libspu.FieldType.FM64, "FM128": libspu.FieldType.FM128}

# Protocols that give correct outputs when the server and the client run in separate processes.
# REF2K is missing because in spu 0.9.5 each REF2K party stores the plaintext that it infeeds as
# its whole share, and REF2K's operations on secrets send no messages to the peer. So the server
# computes on zero placeholders of the client's inputs, and the client reconstructs that result.
TWO_PARTY_PROTOCOLS = ("CHEETAH", "SEMI2K")


def check_two_party_protocol(protocol: str) -> None:
    """Raise ValueError unless ``protocol`` gives correct outputs between two processes."""
    if protocol in TWO_PARTY_PROTOCOLS:
        return
    if protocol == "REF2K":
        raise ValueError(
            "SPU protocol 'REF2K' does not work between a server and a client process. Each "
            "REF2K party computes on its own plaintext inputs only, so the client would get "
            "logits computed without its text (all zeros for a decoder). Start the server "
            "with --protocol CHEETAH or SEMI2K. Run the REF2K fixed-point reference in one "
            "process instead: 'cipherprompt evaluate' for a classifier checkpoint, "
            "'cipherprompt perplexity' for a decoder checkpoint, or 'python "
            "benchmarks/generation.py --reference-layers N' for a GGUF decoder"
        )
    raise ValueError(f"invalid protocol {protocol!r} for a server and a client; valid choices: "
                     f"{', '.join(TWO_PARTY_PROTOCOLS)}")


@dataclass(frozen=True)
class EngineConfig:
    """Secure-computation settings shared by both parties (they enter the program hash)."""

    # CHEETAH: two-party HE + OT (real protocol); REF2K: same fixed-point arithmetic, no crypto.
    protocol: str = "CHEETAH"
    # Ring of the secret shares; FM64 gives 64-bit fixed point.
    field: str = "FM64"
    # Fractional bits of the fixed-point encoding. A product needs 2 * fraction_bits bits plus
    # its integer part below 2^63 before truncation, so 18 bits allow |x * y| < 2^27. With 24
    # bits a LayerNorm input of 220 (an outlier dimension of the fine-tuned MiniLM) overflowed
    # when squared and returned 0.05 for 8.1.
    fraction_bits: int = 18
    # CHEETAH option that cuts element-wise product traffic by 22% with smaller HE parameters.
    # Off by default, because with it on a whole batch of 8192 products now and then came back
    # as random ring elements: 2 of 1500 runs of exp on 16384 elements, none with it off
    # (benchmarks/product_faults.py). That caused the sporadic wrong CHEETAH outputs.
    mul_lsb_error: bool = False
    # Compiler rewrite that makes softmax-like normalisation 4-15x cheaper.
    optimize_denominator: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"invalid protocol {self.protocol!r}; valid choices: {', '.join(PROTOCOLS)}"
            )
        if self.field not in FIELDS:
            raise ValueError(f"invalid field {self.field!r}; valid choices: {', '.join(FIELDS)}")
        if not 8 <= self.fraction_bits <= 40:
            raise ValueError(f"fraction_bits must be in 8..40, got {self.fraction_bits}")

    def to_dict(self) -> dict:
        return asdict(self)


def runtime_config(engine: EngineConfig, profile: bool = True) -> libspu.RuntimeConfig:
    config = libspu.RuntimeConfig(
        protocol=PROTOCOLS[engine.protocol],
        field=FIELDS[engine.field],
        fxp_fraction_bits=engine.fraction_bits,
    )
    # Without this flag SPU silently ignores owner_rank and secret-shares the weights.
    config.experimental_enable_colocated_optimization = True
    if engine.protocol == "CHEETAH":
        config.cheetah_2pc_config.enable_mul_lsb_error = engine.mul_lsb_error
    config.enable_pphlo_profile = profile
    config.enable_hal_profile = profile
    return config


def compiler_options(engine: EngineConfig) -> libspu.CompilerOptions:
    options = libspu.CompilerOptions()
    options.enable_optimize_denominator_with_broadcast = engine.optimize_denominator
    return options


@dataclass
class Stage:
    """One compiled piece of the model: the embedding, one layer, or the head.

    The model runs as a chain of stages inside one SPU runtime. A stage's output variable is
    named like the next stage's hidden-state input, so intermediate secrets stay inside the
    runtime, and SPU's profile of each run gives that stage's cost on its own line.
    """

    name: str
    executable: libspu.Executable
    param_names: list[str]
    client_names: list[str]
    output_name: str
    # Inputs that both parties infeed themselves as public values, such as a cache position.
    public_names: list[str] = field(default_factory=list)
    # Outputs that stay in the runtime after the run, such as a decoder layer's cache.
    extra_outputs: list[str] = field(default_factory=list)
    # Runtime variables that no later stage reads. The party deletes them after this stage.
    frees: list[str] = field(default_factory=list)


@dataclass
class CompiledModel:
    stages: list[Stage]
    digest: str

    @property
    def output_name(self) -> str:
        return self.stages[-1].output_name


def _leaf_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _param_names(prefix: tuple, subtree) -> list[str]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(subtree)
    base = "".join(f"{key}/" for key in prefix)
    return [f"param:{base}{_leaf_name(path)}" for path, _ in leaves]


def compile_executable(name: str, function, args: list, input_names: list[str],
                       output_names: list[str], engine: EngineConfig,
                       public_names: tuple[str, ...] | list[str] = ()) -> libspu.Executable:
    """Compile ``function(*args)`` for SPU; every input is secret except ``public_names``.

    ``input_names`` name the leaves of ``args`` in flattening order, and ``output_names`` the
    leaves of the result.
    """
    visibilities = [
        libspu.Visibility.VIS_PUBLIC if name in public_names else libspu.Visibility.VIS_SECRET
        for name in input_names
    ]
    function.__name__ = f"cipherprompt_{name}"
    executable, _ = frontend.compile(
        frontend.Kind.JAX,
        function,
        args,
        {},
        input_names,
        visibilities,
        lambda outputs: list(output_names),
        copts=compiler_options(engine),
    )
    return executable


def compile_stage(name, function, param_prefix, params, client_inputs, hidden_input, output_name,
                  engine, public_inputs=None, extra_inputs=None, extra_outputs=()) -> Stage:
    """Compile ``function(params, *client_inputs, *public_inputs[, hidden], *extra_inputs)``.

    Inputs and outputs are named variables of the runtime. Every input is secret except
    ``public_inputs``. The first output is ``output_name``, then ``extra_outputs`` in order.
    The stage frees its hidden input, the previous stage's output, after it runs.
    """
    public_inputs = public_inputs or {}
    extra_inputs = extra_inputs or {}
    param_names = _param_names(param_prefix, params)
    client_names = list(client_inputs)
    names = param_names + client_names + list(public_inputs)
    args = [params, *client_inputs.values(), *public_inputs.values()]
    frees = []
    if hidden_input is not None:
        names.append(hidden_input[0])
        args.append(hidden_input[1])
        frees.append(hidden_input[0])
    names += list(extra_inputs)
    args += list(extra_inputs.values())
    executable = compile_executable(name, function, args, names, [output_name, *extra_outputs],
                                    engine, list(public_inputs))
    return Stage(name, executable, param_names, client_names, output_name, list(public_inputs),
                 list(extra_outputs), frees)


def program_digest(stages: list[Stage], plan: OperatorPlan, engine: EngineConfig) -> str:
    """Hash the compiled stages, their variable names, the plan and the engine with SHA-256."""
    digest = hashlib.sha256()
    for stage in stages:
        digest.update(stage.name.encode())
        digest.update(stage.executable.code)
        digest.update("\n".join(stage.param_names + stage.client_names).encode())
        # Only stages that have public inputs or extra outputs add them, so the classifier's
        # digests stay what they were before these fields existed.
        if stage.public_names or stage.extra_outputs:
            digest.update("\n".join(stage.public_names + stage.extra_outputs).encode())
    digest.update(plan.canonical_json().encode())
    digest.update(repr(sorted(engine.to_dict().items())).encode())
    return digest.hexdigest()


def compile_classifier(
    config: BertConfig, plan: OperatorPlan, max_len: int, engine: EngineConfig, batch: int = 1
) -> CompiledModel:
    """Compile the classifier for ``batch`` texts of ``max_len`` tokens from shapes alone.

    Client inputs: ``onehot`` [batch, max_len, vocab] (the private token ids), ``mask``
    [batch, max_len] and ``pool`` [batch, max_len] (mean-pooling weights). Weights are named
    ``param:<path>``. A private query uses batch 1; larger batches serve fixed-point reference
    runs over a whole data set. The batch size enters the program, and so its hash.
    """
    params = init_params(config, seed=0)
    hidden = np.zeros((batch, max_len, config.hidden_size), np.float32)
    client = _client_inputs(config, max_len, batch)
    stages = []

    def embedding(embeddings, onehot):
        return embed({"embeddings": embeddings}, config, plan, onehot)

    stages.append(
        compile_stage("embedding", embedding, ("embeddings",), params["embeddings"],
                       {"onehot": client["onehot"]}, None, "hidden:embedding", engine)
    )
    for index in range(config.num_layers):

        def layer(layer_params, mask, x, index=index):
            with jax.named_scope(f"layer{index}"):
                return encoder_layer(layer_params, config, plan.layers[index], x, mask)[0]

        stages.append(
            compile_stage(f"layer{index}", layer, ("layers", index), params["layers"][index],
                           {"mask": client["mask"]}, (stages[-1].output_name, hidden),
                           f"hidden:layer{index}", engine)
        )

    def head(classifier, pool, x):
        return classifier_head({"classifier": classifier}, x, pool)

    stages.append(
        compile_stage("head", head, ("classifier",), params["classifier"],
                       {"pool": client["pool"]}, (stages[-1].output_name, hidden), "logits",
                       engine)
    )

    return CompiledModel(stages, program_digest(stages, plan, engine))


def _client_inputs(config: BertConfig, max_len: int, batch: int) -> dict[str, np.ndarray]:
    """Zero placeholders of the client's inputs, by runtime variable name."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return {
        "onehot": np.zeros((batch, max_len, config.vocab_size), np.float32),
        "mask": np.zeros((batch, max_len), np.float32),
        "pool": np.zeros((batch, max_len), np.float32),
    }


# Client inputs of the step program by the model's state key. Their runtime names are those of
# compile_classifier, so one runtime with the weights infed runs both programs.
_STATE_INPUTS = {"tokens": "onehot", "mask": "mask", "pool": "pool"}


def compile_classifier_steps(
    config: BertConfig, plan: OperatorPlan, max_len: int, engine: EngineConfig, batch: int = 1
) -> CompiledModel:
    """Compile the classifier as one stage per step of its blocks, for cost attribution.

    Each step of ``classifier_blocks`` becomes a stage named ``<block>/<step>``, such as
    ``layer0/scores``, compiled under the block's named scope as in the fused model. Inputs and
    weights have the runtime names that ``compile_classifier`` gives them. A state entry that a
    step writes becomes the secret runtime variable ``state:<stage>/<entry>`` and is deleted
    after the last stage that reads it. The last stage writes ``logits``.
    """
    params = init_params(config, seed=0)
    client = _client_inputs(config, max_len, batch)
    examples = {key: client[name] for key, name in _STATE_INPUTS.items()}
    variables = dict(_STATE_INPUTS)
    stages: list[Stage] = []
    last_reader: dict[str, int] = {}
    for block in classifier_blocks(config, plan):
        block_params = params
        for key in block.param_path:
            block_params = block_params[key]
        for step in block.steps:
            name = f"{block.scope}/{step.name}"
            weights = {key: block_params[key] for key in step.params}
            inputs = [examples[key] for key in step.reads]

            def run(weights, *inputs, step=step, block=block):
                with jax.named_scope(block.scope):
                    state = step(weights, config, block.plan, dict(zip(step.reads, inputs)))
                return tuple(state[key] for key in step.writes)

            outputs = jax.eval_shape(run, weights, *inputs)
            read_names = [variables[key] for key in step.reads]
            for key, output in zip(step.writes, outputs, strict=True):
                examples[key] = np.zeros(output.shape, output.dtype)
                variables[key] = "logits" if key == "logits" else f"state:{name}/{key}"
            output_names = [variables[key] for key in step.writes]
            param_names = _param_names(block.param_path, weights)
            executable = compile_executable(name.replace("/", "_"), run, [weights, *inputs],
                                            param_names + read_names, output_names, engine)
            client_names = [read for read in read_names if read in client]
            stages.append(Stage(name, executable, param_names, client_names, output_names[0],
                                extra_outputs=output_names[1:]))
            for read in read_names:
                last_reader[read] = len(stages) - 1
            for output in output_names:
                last_reader[output] = len(stages) - 1

    for variable, index in last_reader.items():
        if variable not in client and variable != "logits":
            stages[index].frees.append(variable)
    return CompiledModel(stages, program_digest(stages, plan, engine))


# Names of the two parts that ``compile_hidden_input`` adds up.
HIDDEN_SERVER_PART = "param:hidden_input/server_part"
HIDDEN_CLIENT_PART = "hidden_input/client_part"


def compile_hidden_input(config: BertConfig, max_len: int, engine: EngineConfig,
                         batch: int = 1) -> Stage:
    """Compile a stage that replaces the embedding: the sum of a server part and a client part.

    Benchmarks of single layers start with it. The sum of a server-owned and a client-owned
    secret is an additive sharing of the layer's input, as the embedding's output is, and the
    addition is local, so it costs no communication. Its output has the embedding's name, so the
    compiled layers take it unchanged. The server part is named like a weight (``param:``).
    """
    shape = (batch, max_len, config.hidden_size)

    def hidden_input(server, client):
        return server["server_part"] + client

    return compile_stage("hidden_input", hidden_input, ("hidden_input",),
                          {"server_part": np.zeros(shape, np.float32)},
                          {HIDDEN_CLIENT_PART: np.zeros(shape, np.float32)}, None,
                          "hidden:embedding", engine)


def named_weights(params: Params) -> dict[str, np.ndarray]:
    """Map every weight to the name the compiled stages use for it."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {f"param:{_leaf_name(path)}": np.asarray(leaf, np.float32) for path, leaf in leaves}


def make_io(engine: EngineConfig) -> spu.Io:
    return spu.Io(WORLD_SIZE, runtime_config(engine, profile=False))
