"""Private text generation with a Llama-family decoder: the prompt and step programs on SPU.

A generation runs one prompt program, then one step program per new token after the first,
inside the session's SPU runtime. Rank 0 (the server) owns the weights, rank 1 (the client)
owns every token.

- The prompt program of a length bucket takes the left-padded prompt as the client's one-hot
  rows (``onehot`` [1, bucket, vocab]) and a key mask (``mask`` [1, bucket], 0.0 on padding).
  It outputs the last position's logits and every layer's keys and values, padded to the cache
  capacity, as the secret variables ``cache:layerN:keys`` and ``cache:layerN:values``. They
  stay inside the runtime, like the classifier's hidden states between stages.
- The step program takes the previous token as the client's one-hot row (``token``
  [1, 1, vocab]) and a key mask over every cache slot (``step_mask`` [1, capacity]). The slot
  to write is ``position``, a public int32 that each party infeeds itself. It attends over all
  slots, writes the token's keys and values into its slot, and outputs that token's logits.

Left padding puts the last prompt token in the bucket's last slot, so the prompt's logits are
those of a public row, and step number s (from 0) writes slot bucket + s. The server learns the
bucket and the number of steps, which it needs to choose the slot, but not the prompt length:
that is in the client's private key mask. Each program runs as a chain of stages (embedding,
layers, head) so that SPU's profile gives each stage's cost.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import spu.libspu as libspu

from cipherprompt.models.bert import one_hot
from cipherprompt.models.llama import (
    LlamaConfig,
    Params,
    decoder_layer,
    embed,
    final_norm,
    lm_head,
    param_shapes,
    prompt_context,
    step_context,
)
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.cost import QueryCost
from cipherprompt.secure.engine import (
    CLIENT_RANK,
    CompiledModel,
    EngineConfig,
    compile_stage,
    program_digest,
)
from cipherprompt.secure.party import SecureParty
from cipherprompt.secure.wire import Message

log = logging.getLogger(__name__)

# The key of the step program in the welcome's ``programs``, beside the prompt buckets.
STEP_PROGRAM = "step"


def cache_names(layer: int) -> tuple[str, str]:
    """Return the runtime variables that contain the keys and the values of ``layer``."""
    return f"cache:layer{layer}:keys", f"cache:layer{layer}:values"


def cache_capacity(buckets: Sequence[int], max_new_tokens: int) -> int:
    """Return the cache slots that ``max_new_tokens`` after the largest bucket need.

    The first new token comes from the prompt program; each later one is fed back through a step,
    which writes one slot. The last new token is never fed back, so it needs no slot.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return max(buckets) + max_new_tokens - 1


@dataclass
class CompiledDecoder:
    """The prompt program of every bucket and the step program, with their joint digest."""

    prompts: dict[int, CompiledModel]
    step: CompiledModel
    capacity: int
    digest: str

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.prompts))

    def program_digests(self) -> dict[str, str]:
        """Return each program's digest, keyed by bucket and ``step``, for the welcome."""
        digests = {str(bucket): program.digest for bucket, program in self.prompts.items()}
        digests[STEP_PROGRAM] = self.step.digest
        return digests


def _shape_params(config: LlamaConfig) -> Params:
    """Return zero weights of the model's shapes; compilation needs the shapes only."""

    def build(tree):
        if isinstance(tree, dict):
            return {key: build(value) for key, value in tree.items()}
        if isinstance(tree, list):
            return [build(value) for value in tree]
        return np.zeros(tree, np.float32)

    return build(param_shapes(config))


def _head_params(params: Params) -> Params:
    """Return the weights of the head stage: the final norm and the output projection."""
    names = ("final_norm", "lm_head") if "lm_head" in params else ("final_norm", "embeddings")
    return {name: params[name] for name in names}


def _compile_chain(config: LlamaConfig, plan: OperatorPlan, engine: EngineConfig,
                   params: Params, tokens: tuple[str, np.ndarray], mask: tuple[str, np.ndarray],
                   layer_function, public_inputs: dict, cache_inputs: bool) -> CompiledModel:
    """Compile embedding, layers and head stages that share the token, mask and cache names."""
    seq_len = tokens[1].shape[1]
    hidden = np.zeros((1, seq_len, config.hidden_size), np.float32)
    cache_shape = (1, config.num_kv_heads, mask[1].shape[1] if cache_inputs else 0,
                   config.head_size)

    def embedding(embeddings, onehot):
        return embed({"embeddings": embeddings}, onehot)

    stages = [compile_stage("embedding", embedding, ("embeddings",), params["embeddings"],
                             {tokens[0]: tokens[1]}, None, "hidden:embedding", engine)]
    for index in range(config.num_layers):

        def layer(layer_params, key_mask, *rest, index=index):
            with jax.named_scope(f"layer{index}"):
                return layer_function(index, layer_params, key_mask, *rest)

        extra_inputs = {}
        if cache_inputs:
            keys, values = cache_names(index)
            extra_inputs = {keys: np.zeros(cache_shape, np.float32),
                            values: np.zeros(cache_shape, np.float32)}
        stages.append(
            compile_stage(f"layer{index}", layer, ("layers", index), params["layers"][index],
                           {mask[0]: mask[1]}, (stages[-1].output_name, hidden),
                           f"hidden:layer{index}", engine, public_inputs=public_inputs,
                           extra_inputs=extra_inputs, extra_outputs=cache_names(index))
        )

    def head(head_params, x):
        return lm_head(head_params, config, final_norm(head_params, config, plan, x[:, -1]))

    stages.append(compile_stage("head", head, (), _head_params(params), {},
                                 (stages[-1].output_name, hidden), "logits", engine))
    return CompiledModel(stages, program_digest(stages, plan, engine))


def compile_decoder(config: LlamaConfig, plan: OperatorPlan, buckets: Sequence[int],
                    max_new_tokens: int, engine: EngineConfig) -> CompiledDecoder:
    """Compile the prompt program of each bucket and the step program from shapes alone."""
    buckets = tuple(sorted(buckets))
    capacity = cache_capacity(buckets, max_new_tokens)
    if capacity > config.max_positions:
        raise ValueError(
            f"the largest bucket {buckets[-1]} plus {max_new_tokens} new tokens needs "
            f"{capacity} positions, more than the model's {config.max_positions}; choose "
            "smaller buckets or fewer new tokens"
        )
    params = _shape_params(config)
    vocab = config.vocab_size

    def prompt_layer(index, layer_params, key_mask, x):
        mask, rotary = prompt_context(config, key_mask)
        empty = jnp.zeros((1, config.num_kv_heads, 0, config.head_size), jnp.float32)
        x, (keys, values) = decoder_layer(layer_params, config, plan.layers[index], x,
                                          (empty, empty), mask, rotary)
        widths = ((0, 0), (0, 0), (0, capacity - keys.shape[2]), (0, 0))
        return x, jnp.pad(keys, widths), jnp.pad(values, widths)

    def step_layer(index, layer_params, key_mask, position, x, keys, values):
        mask, rotary = step_context(config, key_mask, position)
        x, (keys, values) = decoder_layer(layer_params, config, plan.layers[index], x,
                                          (keys, values), mask, rotary, write_index=position)
        return x, keys, values

    prompts = {}
    for bucket in buckets:
        log.info("compiling the prompt program for %d tokens", bucket)
        prompts[bucket] = _compile_chain(
            config, plan, engine, params, ("onehot", np.zeros((1, bucket, vocab), np.float32)),
            ("mask", np.zeros((1, bucket), np.float32)), prompt_layer, {}, cache_inputs=False)
    log.info("compiling the step program for a cache of %d slots", capacity)
    step = _compile_chain(
        config, plan, engine, params, ("token", np.zeros((1, 1, vocab), np.float32)),
        ("step_mask", np.zeros((1, capacity), np.float32)), step_layer,
        {"position": np.zeros((), np.int32)}, cache_inputs=True)

    digest = hashlib.sha256()
    for bucket in buckets:
        digest.update(f"{bucket}:{prompts[bucket].digest}\n".encode())
    digest.update(f"{STEP_PROGRAM}:{step.digest}:{capacity}\n".encode())
    return CompiledDecoder(prompts, step, capacity, digest.hexdigest())


# -- the client's private inputs -----------------------------------------------------------------


def prompt_inputs(ids: Sequence[int], bucket: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Return the prompt program's client inputs: ``ids`` left-padded to ``bucket`` with id 0.

    The padding's id does not matter: the key mask hides it from every real token.
    """
    if not 1 <= len(ids) <= bucket:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit the bucket {bucket}")
    padding = bucket - len(ids)
    padded = np.concatenate([np.zeros(padding, np.int64), np.asarray(ids, np.int64)])
    mask = np.concatenate([np.zeros(padding), np.ones(len(ids))]).astype(np.float32)
    return {"onehot": one_hot(padded[None, :], vocab_size), "mask": mask[None, :]}


def step_inputs(token: int, bucket: int, prompt_length: int, steps_done: int, capacity: int,
                vocab_size: int) -> dict[str, np.ndarray]:
    """Return the step program's client inputs for the step after ``steps_done`` steps.

    The key mask shows the real prompt tokens (the last ``prompt_length`` slots of the bucket),
    the slots of the earlier steps and the step's own slot, bucket + ``steps_done``.
    """
    position = bucket + steps_done
    if position >= capacity:
        raise ValueError(f"slot {position} is beyond the cache capacity {capacity}")
    mask = np.zeros((1, capacity), np.float32)
    mask[0, bucket - prompt_length:position + 1] = 1.0
    return {"token": one_hot(np.array([[token]]), vocab_size), "step_mask": mask}


# -- the server's side of a session --------------------------------------------------------------


class DecoderRequests:
    """``prompt`` and ``step`` requests of one generation session, run in the session's child.

    A prompt request names a bucket and starts a generation (again, if one ran before); each
    step request runs the next step of that generation. The server keeps the step count itself,
    so the slot to write never comes from the client.
    """

    kinds = ("prompt", "step")

    def __init__(self, programs: CompiledDecoder, vocab_size: int):
        self.programs = programs
        self.vocab_size = vocab_size
        # The bucket of the running generation, and the steps it ran; None before any prompt.
        self.bucket: int | None = None
        self.steps_done = 0

    def accept(self, message: Message) -> dict:
        if message.kind == "prompt":
            bucket = message.payload.get("bucket")
            if type(bucket) is not int or bucket not in self.programs.prompts:
                raise ValueError(
                    f"bucket {bucket!r} is not one of this server's prompt buckets "
                    f"{', '.join(map(str, self.programs.buckets))}; pad the prompt to one of them"
                )
            return {"bucket": bucket}
        if self.bucket is None:
            raise ValueError("a step request needs a prompt request first")
        position = self.bucket + self.steps_done
        if position >= self.programs.capacity:
            raise ValueError(
                f"the key/value cache is full after {self.steps_done} steps from bucket "
                f"{self.bucket} ({self.programs.capacity} slots); send a new prompt"
            )
        return {"position": position}

    def run(self, party: SecureParty, accepted: dict) -> tuple[QueryCost, libspu.Share]:
        vocab, capacity = self.vocab_size, self.programs.capacity
        if "bucket" in accepted:
            bucket = accepted["bucket"]
            placeholders = {"onehot": (1, bucket, vocab), "mask": (1, bucket)}
            program = self.programs.prompts[bucket]
        else:
            placeholders = {"token": (1, 1, vocab), "step_mask": (1, capacity)}
            program = self.programs.step
            party.set_public("position", np.asarray(accepted["position"], np.int32))
        # The client's inputs are secrets it owns: the server infeeds zero placeholders.
        for name, shape in placeholders.items():
            party.set_secret(name, np.zeros(shape, np.float32), owner=CLIENT_RANK)
        cost = party.run(program)
        if "bucket" in accepted:
            self.bucket, self.steps_done = accepted["bucket"], 0
        else:
            self.steps_done += 1
        return cost, party.output_share(program)


# -- the fixed-point reference -------------------------------------------------------------------


class ReferenceDecoder:
    """The decoder's prompt and step programs under SPU's REF2K protocol, in this process.

    REF2K computes the same fixed-point arithmetic as CHEETAH without cryptography. One
    runtime of world size 1 contains both parties' inputs. It is a fast check of the programs'
    precision, and of the cache against recomputing the prefix.
    """

    def __init__(self, config: LlamaConfig, plan: OperatorPlan, params: Params,
                 buckets: Sequence[int], max_new_tokens: int, engine: EngineConfig):
        import spu

        from cipherprompt.secure.engine import named_weights, runtime_config

        if engine.protocol != "REF2K":
            raise ValueError(f"ReferenceDecoder needs protocol REF2K, got {engine.protocol!r}")
        self.config = config
        self.programs = compile_decoder(config, plan, buckets, max_new_tokens, engine)
        runtime = runtime_config(engine, profile=False)
        description = libspu.link.Desc()
        description.add_party("reference", "memory")
        self._link = libspu.link.create_mem(description, 0)
        self._runtime = spu.Runtime(self._link, runtime)
        self._io = spu.Io(1, runtime)
        for name, value in named_weights(params).items():
            self._set(name, value)

    def _set(self, name: str, value: np.ndarray,
             visibility=libspu.Visibility.VIS_SECRET) -> None:
        shares = self._io.make_shares(np.array(value, order="C"), visibility, owner_rank=0)
        self._runtime.set_var(name, shares[0])

    def _run(self, program: CompiledModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in inputs.items():
            self._set(name, value)
        for index, stage in enumerate(program.stages):
            self._runtime.run(stage.executable)
            if index > 0:
                self._runtime.del_var(program.stages[index - 1].output_name)
        output = self._runtime.get_var(program.output_name)
        return np.asarray(self._io.reconstruct([output]), np.float32)[0]

    def prompt(self, ids: Sequence[int], bucket: int) -> np.ndarray:
        """Run the prompt program on ``ids``; return the last token's logits [vocab]."""
        return self._run(self.programs.prompts[bucket],
                         prompt_inputs(ids, bucket, self.config.vocab_size))

    def step(self, token: int, bucket: int, prompt_length: int, steps_done: int) -> np.ndarray:
        """Run the step after ``steps_done`` steps on ``token``; return its logits [vocab]."""
        position = bucket + steps_done
        self._set("position", np.asarray(position, np.int32), libspu.Visibility.VIS_PUBLIC)
        return self._run(self.programs.step,
                         step_inputs(token, bucket, prompt_length, steps_done,
                                     self.programs.capacity, self.config.vocab_size))
