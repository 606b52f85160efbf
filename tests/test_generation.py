"""Private text generation with a tiny random decoder: client and server on 127.0.0.1.

The decoder has 2 layers, hidden size 64, 4 query heads over 2 key/value heads and a 512-token
vocabulary; the client uses the byte tokenizer. A private step takes a few seconds under CHEETAH
on 2 cores.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from secure_helpers import assert_no_tracebacks, make_tiny_checkpoint, wait_for, wait_for_log

from cipherprompt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cipherprompt.llama_tokenizer import ByteTokenizer, tokenizer_spec
from cipherprompt.models.llama import LlamaConfig, forward, generate_greedy, init_params
from cipherprompt.plan import OperatorPlan
from cipherprompt.sampling import Sampler, SamplingConfig
from cipherprompt.secure.client import (
    HandshakeError,
    PrivateClassifier,
    ServerUnreachableError,
)
from cipherprompt.secure.decoder import (
    CompiledDecoder,
    DecoderRequests,
    ReferenceDecoder,
    cache_capacity,
    prompt_inputs,
    step_inputs,
)
from cipherprompt.secure.decoder_server import DecoderServer, DecoderSource
from cipherprompt.secure.engine import EngineConfig
from cipherprompt.secure.generator import PrivateGenerator
from cipherprompt.secure.launch import ServerProcess
from cipherprompt.secure.server import ServerConfig
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    Message,
    PeerError,
    free_port,
    recv_message,
    send_message,
)
from cipherprompt.tokenizer import EmptyTextError, TextTooLongError

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=96, max_positions=128, rope_theta=10000.0)
PLAN = OperatorPlan.preset("decoder-exact", CONFIG.num_layers)
BUCKETS = (16, 32)
MAX_NEW_TOKENS = 8
# The plaintext top-two margin of its first 6 choices is at least 0.139 with these weights.
PROMPT = "The cat sat"
# Private logits against plaintext float32 logits of the same model, with these weights (scale
# 0.2, logits within about +-6). Fixed point alone (REF2K in one process, prompt and 5 steps of
# PROMPT) gives 0.018 to 0.035, from SPU's exp, reciprocal and rsqrt approximations and
# truncation at 18 fractional bits. CHEETAH adds its truncation errors: over 9 runs of
# test_hide_length_runs_all_steps the largest error was 0.068, on the fourth run each time
# (0.045 to 0.068). A wrong mask, slot or rotary position gives errors of order 1.
LOGIT_BOUND = 0.1

# A client process for the fault test: one session, generations until killed. Prints "token"
# after each new token.
GENERATE_LOOP = """
import sys
from cipherprompt.secure.generator import PrivateGenerator
with PrivateGenerator(sys.argv[1], work_dir=sys.argv[2]) as client:
    ids = client.encode_prompt("The cat sat", chat=False)
    for _ in range(100):
        client.generate(ids, 8, on_token=lambda token: print("token", flush=True),
                        stop_at_eos=False)
"""


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    params = init_params(CONFIG, seed=8, scale=0.2)
    path = tmp_path_factory.mktemp("decoder") / "decoder.npz"
    save_checkpoint(path, Checkpoint(params, CONFIG, PLAN, BUCKETS[0],
                                     {"name": "tiny-decoder",
                                      "tokenizer": tokenizer_spec("bytes", "")}))
    return path, params


@pytest.fixture(scope="module")
def server(tiny_decoder, tmp_path_factory):
    arguments = ("--buckets", ",".join(map(str, BUCKETS)), "--max-new-tokens",
                 str(MAX_NEW_TOKENS), "--idle-timeout", "120")
    with ServerProcess(tiny_decoder[0], tmp_path_factory.mktemp("server"), extra_args=arguments,
                       start_timeout_s=300, command="serve-decoder") as process:
        yield process


def assert_logits_follow(generation, params, sequence: list[int], prompt_len: int,
                         name: str) -> None:
    """Assert that run k's logits match plaintext on the first prompt_len + k ids of sequence."""
    for count, logits in enumerate(generation.logits):
        reference = plaintext_logits(params, sequence[:prompt_len + count])
        error = np.abs(logits - reference).max()
        assert error < LOGIT_BOUND, (f"{name} run {count}: logit error {error:.2e}, "
                                     f"largest |logit| {np.abs(logits).max():.2e}")


def plaintext_logits(params, ids: list[int]) -> np.ndarray:
    """Return the float32 logits of the last position after ``ids``, without padding."""
    logits, _ = forward(params, CONFIG, PLAN, jnp.asarray([ids]))
    return np.asarray(logits)[0, -1]


def top_two_margin(logits: np.ndarray) -> float:
    highest = np.sort(logits)[-2:]
    return float(highest[1] - highest[0])


# -- two parties -----------------------------------------------------------------------------


def test_private_greedy_matches_plaintext(server, tiny_decoder, tmp_path):
    _, params = tiny_decoder
    streamed = []
    with PrivateGenerator(server.address, work_dir=tmp_path) as client:
        prompt_ids = client.encode_prompt(PROMPT, chat=False)
        generation = client.generate(prompt_ids, 6, on_token=streamed.append,
                                     stop_at_eos=False)

    expected = generate_greedy(params, CONFIG, PLAN, prompt_ids, 6)
    assert generation.token_ids == expected
    assert streamed == expected
    assert generation.bucket == 16
    assert generation.prompt_tokens == 11
    assert [run.kind for run in generation.runs] == ["prompt"] + ["step"] * 5
    assert [run.position for run in generation.runs[1:]] == [16, 17, 18, 19, 20]
    for count, logits in enumerate(generation.logits):
        reference = plaintext_logits(params, prompt_ids + expected[:count])
        error = np.abs(logits - reference).max()
        assert error < LOGIT_BOUND, f"run {count}: logit error {error:.2e}"
        # Otherwise this run's error could flip the choice, and the test would not show that
        # the private tokens follow the model.
        assert top_two_margin(reference) > 2 * error, f"run {count}: choose another prompt"
    for run in generation.runs:
        assert run.cost.bytes_sent > 0
        assert run.server_peak_memory_kib > 0


def test_semi2k_generation_matches_plaintext(tiny_decoder, tmp_path):
    path, params = tiny_decoder
    arguments = ("--buckets", "16", "--max-new-tokens", "4", "--protocol", "SEMI2K")
    with ServerProcess(path, tmp_path / "server", extra_args=arguments, start_timeout_s=300,
                       command="serve-decoder") as server:
        with PrivateGenerator(server.address, work_dir=tmp_path / "client") as client:
            prompt_ids = client.encode_prompt(PROMPT, chat=False)
            generation = client.generate(prompt_ids, 3, stop_at_eos=False)
            protocol = client.engine.protocol
        server_log = server.log_path.read_text()

    assert protocol == "SEMI2K"
    expected = generate_greedy(params, CONFIG, PLAN, prompt_ids, 3)
    assert_logits_follow(generation, params, prompt_ids + expected, len(prompt_ids), "semi2k")
    assert generation.token_ids == expected
    assert "protocol SEMI2K: this server is SPU's trusted first party" in server_log


def test_cache_and_recompute_same_logits(server, tiny_decoder, tmp_path):
    with PrivateGenerator(server.address, work_dir=tmp_path) as client:
        prompt_ids = client.encode_prompt(PROMPT, chat=False)
        cached = client.generate(prompt_ids, 5, stop_at_eos=False)
        recomputed = client.generate(prompt_ids, 5, stop_at_eos=False, recompute=True)

    assert recomputed.token_ids == cached.token_ids
    assert [run.kind for run in recomputed.runs] == ["prompt"] + ["recompute"] * 4
    # 11 prompt tokens: the prefixes of 12 to 15 tokens still fit the 16-token bucket.
    assert [run.bucket for run in recomputed.runs] == [16] * 5
    for count, (step, rerun) in enumerate(zip(cached.logits, recomputed.logits)):
        difference = np.abs(step - rerun).max()
        assert difference < 2 * LOGIT_BOUND, f"run {count}: difference {difference:.2e}"


def test_second_generation_in_session(server, tiny_decoder, tmp_path):
    # A new prompt starts over in the same session: the server resets its step count.
    _, params = tiny_decoder
    with PrivateGenerator(server.address, work_dir=tmp_path) as client:
        first = client.generate(client.encode_prompt("abc", chat=False), 3, stop_at_eos=False)
        ids = client.encode_prompt("a longer prompt of twenty", chat=False)
        second = client.generate(ids, 3, stop_at_eos=False)

    assert first.token_ids == generate_greedy(params, CONFIG, PLAN, list(b"abc"), 3)
    assert second.bucket == 32
    assert second.token_ids == generate_greedy(params, CONFIG, PLAN, ids, 3)


def test_hide_length_runs_all_steps(server, tiny_decoder, tmp_path):
    _, params = tiny_decoder
    ids = list(PROMPT.encode())
    expected = generate_greedy(params, CONFIG, PLAN, ids, 2)
    # The steps that hide_length runs after the end-of-sequence token feed the model's own
    # choices back, so their logits follow the plaintext continuation.
    continued = generate_greedy(params, CONFIG, PLAN, ids, 4)
    with PrivateGenerator(server.address, work_dir=tmp_path) as client:
        # The random model never chooses the byte tokenizer's end id, so its second choice
        # becomes the end-of-sequence token.
        client.tokenizer.eos_id = expected[1]
        stopped = client.generate(ids, 4)
        hidden = client.generate(ids, 4, hide_length=True)

    # The logits come before the tokens, so that a failure names the wrong run and its error.
    # Mismatched shares reconstruct to values far beyond this model's logits of about +-5.
    for name, generation in (("stopped", stopped), ("hidden", hidden)):
        assert_logits_follow(generation, params, ids + continued, len(ids), name)
    assert stopped.token_ids == expected
    assert stopped.stop_reason == "eos"
    assert len(stopped.runs) == 2
    assert hidden.token_ids == expected
    assert hidden.stop_reason == "eos"
    assert [run.kind for run in hidden.runs] == ["prompt", "step", "step", "step"]


def test_generate_command_streams_and_reports(server, tmp_path):
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "generate", "--server", server.address,
         "--no-chat", "--max-new-tokens", "4", "--report", str(report_path), "--work-dir",
         str(tmp_path), PROMPT],
        capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "cache"
    assert report["prompt_bucket"] == 16
    assert report["cache_capacity"] == cache_capacity(BUCKETS, MAX_NEW_TOKENS)
    assert report["new_tokens"] == 4
    assert report["prompt_phase"]["kind"] == "prompt"
    assert [step["position"] for step in report["steps"]] == [16, 17, 18]
    assert report["per_token_mean"]["count"] == 3
    assert report["per_token_mean"]["bytes"] > 0
    assert report["memory"]["client_peak_kib"] > 0
    assert report["memory"]["server_session_peak_kib"] > 0
    assert "per token after the first (3, cached step)" in result.stderr
    # The report is for sharing: no prompt text.
    assert PROMPT not in report_path.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("",), "the prompt is empty"),
        (("--max-new-tokens", "0", "hi"), "--max-new-tokens must be at least 1"),
        (("--top-k", "3", "hi"), "top_k needs a temperature above 0"),
        (("--temperature", "-1", "hi"), "temperature must be a finite number"),
    ],
)
def test_generate_command_rejects_invalid_input(server, tmp_path, arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "generate", "--server", server.address,
         "--no-chat", "--work-dir", str(tmp_path), *arguments],
        capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 2
    assert message in result.stderr


def test_requests_that_cannot_fit_are_rejected(server, tmp_path):
    with PrivateGenerator(server.address, work_dir=tmp_path) as client:
        with pytest.raises(EmptyTextError, match="the prompt is empty"):
            client.encode_prompt("   ", chat=False)
        with pytest.raises(TextTooLongError, match="largest prompt bucket of 32.*--buckets"):
            client.generate([65] * 33, 2)
        # After a 32-token bucket the cache has room for 8 new tokens: 39 slots - 32 + 1.
        with pytest.raises(ValueError, match="exceeds what the server's cache allows after a "
                                             "32-token prompt bucket: 8"):
            client.generate([65] * 20, 9)
        with pytest.raises(ValueError, match="recomputing needs a prompt bucket of 37 tokens"):
            client.generate([65] * 30, 8, recompute=True)
        with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, 512\)"):
            client.generate([512], 2)
        # The session still works after rejections on the client's side.
        assert len(client.generate([65, 66], 2, stop_at_eos=False).token_ids) == 2


def test_server_survives_killed_client(server, tmp_path):
    ended_before = server.log_path.read_text().count("session end")
    client = subprocess.Popen(
        [sys.executable, "-c", GENERATE_LOOP, server.address, str(tmp_path / "killed")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Wait until a few steps ran, so the kill lands inside a generation.
        for _ in range(3):
            line = client.stdout.readline()
            assert line.startswith("token"), f"the client failed: {line}{client.stdout.read()}"
    finally:
        client.kill()
        client.wait()
    # The session ends with "client closed the control connection during query" when the kill
    # came during a run, or with "connection closed by peer" when it came between two runs.
    wait_for(lambda: server.log_path.read_text().count("session end") > ended_before, 60,
             "the killed client's session to end")
    ended = server.log_path.read_text().split("session end")[ended_before + 1]
    assert "outcome=closed" not in ended.splitlines()[0]

    with PrivateGenerator(server.address, work_dir=tmp_path / "next") as next_client:
        generation = next_client.generate([72, 105], 2, stop_at_eos=False)
    assert len(generation.token_ids) == 2
    assert_no_tracebacks(server.log_path)


def test_classifier_client_rejected_by_decoder_server(server, tmp_path):
    with pytest.raises(HandshakeError, match="task differs: client requests 'classify', this "
                                             "server serves 'generate'; use 'cipherprompt "
                                             "generate'"):
        PrivateClassifier(server.address, work_dir=tmp_path).connect()


def test_pinned_plan_mismatch_rejected(server, tmp_path):
    client = PrivateGenerator(server.address, work_dir=tmp_path, expected_plan="friendly")
    with pytest.raises(HandshakeError, match="plan differs: client expects 'friendly', server "
                                             "has 'decoder-exact'"):
        client.connect()
    wait_for_log(server.log_path, "rejected: plan differs")


def test_generator_rejected_by_classifier_server(tmp_path):
    checkpoint, *_ = make_tiny_checkpoint(tmp_path / "classifier.npz")
    with ServerProcess(checkpoint, tmp_path / "server", start_timeout_s=300) as classifier:
        with pytest.raises(HandshakeError, match="task differs: client requests 'generate', "
                                                 "this server serves 'classify'"):
            PrivateGenerator(classifier.address, work_dir=tmp_path).connect()


def test_unreachable_server_named(tmp_path):
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(ServerUnreachableError, match=f"cannot reach a cipherprompt server at "
                                                     f"{address}"):
        PrivateGenerator(address, work_dir=tmp_path, connect_timeout_s=2).connect()


def test_serve_decoder_rejects_classifier_checkpoint(tmp_path):
    checkpoint, *_ = make_tiny_checkpoint(tmp_path / "classifier.npz")
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "serve-decoder", "--checkpoint", str(checkpoint),
         "--port", str(free_port("127.0.0.1")), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 2
    assert "contains a classifier, not a decoder" in result.stderr


def test_serve_decoder_rejects_ref2k(tiny_decoder, tmp_path):
    # Before the check, this server started and its clients got all-zero logits.
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "serve-decoder", "--checkpoint",
         str(tiny_decoder[0]), "--protocol", "REF2K", "--port", str(free_port("127.0.0.1")),
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert ("argument --protocol: SPU protocol 'REF2K' does not work between a server and a "
            "client process") in result.stderr
    assert "Start the server with --protocol CHEETAH or SEMI2K" in result.stderr
    assert "'python benchmarks/generation.py --reference-layers N'" in result.stderr


def test_decoder_server_rejects_ref2k_engine(tiny_decoder, tmp_path):
    source = DecoderSource(checkpoint=tiny_decoder[0])
    config = ServerConfig(port=0, work_dir=tmp_path)
    with pytest.raises(ValueError, match="SPU protocol 'REF2K' does not work between a server "
                                         "and a client process"):
        DecoderServer(source, config, EngineConfig(protocol="REF2K"))


def _send_welcome(listener: socket.socket, welcome: dict, received: list) -> None:
    """Accept one client, reply to its hello with ``welcome`` and store its next message."""
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(60)
        recv_message(connection, "hello")
        send_message(connection, "welcome", welcome)
        try:
            received.append(recv_message(connection))
        except (PeerError, OSError) as error:
            received.append(error)


@pytest.mark.parametrize(("client_class", "task"), [(PrivateGenerator, "generate"),
                                                     (PrivateClassifier, "classify")])
def test_client_rejects_ref2k_server(client_class, task, tmp_path):
    # A server from before the start-up check announces REF2K in its welcome.
    welcome = {"protocol_version": PROTOCOL_VERSION, "task": task,
               "tokenizer": tokenizer_spec("bytes", ""),
               "engine": EngineConfig(protocol="REF2K").to_dict()}
    received = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        server = threading.Thread(target=_send_welcome, args=(listener, welcome, received))
        server.start()
        client = client_class(address, work_dir=tmp_path)
        try:
            with pytest.raises(HandshakeError, match="the server's engine cannot serve this "
                                                     "client: SPU protocol 'REF2K' does not "
                                                     "work between a server and a client"):
                client.connect()
        finally:
            server.join(timeout=60)

    assert len(received) == 1
    assert isinstance(received[0], PeerError)
    assert str(received[0]).startswith("the client rejected the session: the server's engine")


# -- one process: the fixed-point reference and the server's request checks ------------------


def test_reference_cache_matches_recompute_and_plaintext(tiny_decoder):
    _, params = tiny_decoder
    reference = ReferenceDecoder(CONFIG, PLAN, params, (8, 16), 6, EngineConfig(protocol="REF2K"))
    prompt = [5, 17, 300, 42, 99]
    tokens = [int(np.argmax(reference.prompt(prompt, 8)))]
    steps = []
    for steps_done in range(4):
        steps.append(reference.step(tokens[-1], 8, len(prompt), steps_done))
        tokens.append(int(np.argmax(steps[-1])))
    # A prompt run replaces the cache, so the recomputations come after the steps.
    for count, step in enumerate(steps):
        prefix = prompt + tokens[:count + 1]
        rerun = reference.prompt(prefix, 8 if len(prefix) <= 8 else 16)
        plain = plaintext_logits(params, prefix)

        assert np.abs(step - plain).max() < LOGIT_BOUND, f"step {count}"
        assert np.abs(rerun - plain).max() < LOGIT_BOUND, f"recompute {count}"
    assert tokens == generate_greedy(params, CONFIG, PLAN, prompt, 5)


def test_decoder_requests_checks():
    # Only the buckets and the capacity matter to the checks: no compiled programs needed.
    programs = CompiledDecoder({16: None, 32: None}, None, cache_capacity(BUCKETS, 3), "digest")
    requests = DecoderRequests(programs, CONFIG.vocab_size)

    with pytest.raises(ValueError, match="a step request needs a prompt request first"):
        requests.accept(Message("step"))
    with pytest.raises(ValueError, match="bucket 20 is not one of this server's prompt buckets "
                                         "16, 32"):
        requests.accept(Message("prompt", {"bucket": 20}))
    assert requests.accept(Message("prompt", {"bucket": 32})) == {"bucket": 32}
    requests.bucket, requests.steps_done = 32, 0
    assert requests.accept(Message("step")) == {"position": 32}
    requests.steps_done = 2
    with pytest.raises(ValueError, match="the key/value cache is full after 2 steps from "
                                         "bucket 32"):
        requests.accept(Message("step"))


def test_client_inputs_mask_padding_and_steps():
    prompt = prompt_inputs([7, 8, 9], 5, 11)
    step = step_inputs(4, 5, 3, 2, 9, 11)

    assert prompt["onehot"].shape == (1, 5, 11)
    assert np.argmax(prompt["onehot"][0], axis=-1).tolist() == [0, 0, 7, 8, 9]
    assert prompt["mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert np.argmax(step["token"][0, 0]) == 4
    # Padding hidden, prompt and two earlier steps visible, the own slot 7 visible, none after.
    assert step["step_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="slot 9 is beyond the cache capacity 9"):
        step_inputs(4, 5, 3, 4, 9, 11)


def test_decoder_checkpoint_round_trip(tiny_decoder):
    checkpoint = load_checkpoint(tiny_decoder[0])

    assert checkpoint.config == CONFIG
    assert checkpoint.plan == PLAN
    assert checkpoint.metadata["tokenizer"]["kind"] == "bytes"


# -- sampling and the byte tokenizer -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.5}, "temperature must be a finite number of 0 or more"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be a whole number of at least 1"),
        ({"top_k": 5}, "top_k needs a temperature above 0"),
        ({"seed": -1}, "seed must be a whole number of 0 or more"),
    ],
)
def test_sampling_config_rejects_invalid(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**options)


def test_sampler_rejects_top_k_above_vocabulary():
    with pytest.raises(ValueError, match="top_k 8 exceeds the vocabulary of 7 tokens"):
        Sampler(SamplingConfig(temperature=1.0, top_k=8), 7)


def test_sampler_modes():
    logits = np.array([0.1, 2.0, 1.9, -3.0, 0.5])
    greedy = Sampler(SamplingConfig(), 5)
    top_one = Sampler(SamplingConfig(temperature=5.0, top_k=1, seed=0), 5)
    top_two = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=3), 5)
    draws = [top_two(logits) for _ in range(200)]
    seeded = Sampler(SamplingConfig(temperature=2.0, seed=11), 5)
    again = Sampler(SamplingConfig(temperature=2.0, seed=11), 5)

    assert greedy(logits) == 1
    assert all(top_one(logits) == 1 for _ in range(20))
    assert set(draws) == {1, 2}
    assert [seeded(logits) for _ in range(30)] == [again(logits) for _ in range(30)]


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("héllo")

    assert ids == list("héllo".encode())
    assert tokenizer.decode(ids + [256]) == "héllo<eos>"
    assert tokenizer.decode(ids + [256], skip_special_tokens=True) == "héllo"
    assert tokenizer.decode([300]) == "\ufffd"

