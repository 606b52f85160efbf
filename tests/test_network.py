"""Emulated networks: addresses, shaping, and clean-up of namespaces and processes.

Tests that create network namespaces need root (CAP_NET_ADMIN) and skip otherwise. Figures of
the link are checked only in the direction load cannot fake: a round trip is at least the
configured delay, a throughput at most the configured rate plus a margin for tbf's burst.
"""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cipherprompt.bench.estimate import Network
from cipherprompt.bench.network import (
    LOOPBACK,
    NAMESPACE_PREFIX,
    NAMESPACES,
    RELAY_ON_LOOPBACK,
    EmulatedNetwork,
    list_namespaces,
    tbf_parameters,
)
from cipherprompt.bench.runner import probe_link

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="creating network namespaces and veth pairs needs root (CAP_NET_ADMIN)",
)

WAN_LIKE = Network("custom", 50e6, 0.02)


def _namespaces_of(pid: int) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(f"{NAMESPACE_PREFIX}{pid}-")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its exit status is left for the parent to collect.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_tbf_parameters_scale_with_rate():
    slow, fast = tbf_parameters(100e6), tbf_parameters(3e9)
    assert slow["rate_bit_s"] == 100_000_000
    assert slow["burst_bytes"] == 64 << 10
    assert fast["burst_bytes"] == int(3e9 / 8 * 0.004)
    assert fast["limit_bytes"] >= 2 * fast["burst_bytes"]


def test_loopback_uses_no_relay(tmp_path):
    with EmulatedNetwork(Network("loopback", math.inf, 0.0), tmp_path) as network:
        endpoints = network.endpoints(1)
        assert network.mode == LOOPBACK
        assert endpoints.relay_routes == ()
        assert endpoints.server_dials == endpoints.client_listen
        assert endpoints.client_dials == endpoints.server_listen


def test_relay_fallback_routes_through_relay(tmp_path):
    with EmulatedNetwork(Network("custom", 200e6, 0.01), tmp_path,
                         use_namespaces=False) as network:
        endpoints = network.endpoints(1)
        assert network.mode == RELAY_ON_LOOPBACK
        assert "namespaces turned off" in network.describe()["fallback_reason"]
        assert network.describe()["relay"]["paced_rate_bit_s"] == 200e6
        # Each party dials the relay, and the relay forwards to the other party's listener.
        assert f"{endpoints.server_dials}={endpoints.client_listen}" in endpoints.relay_routes
        assert f"{endpoints.client_dials}={endpoints.server_listen}" in endpoints.relay_routes
        measured = probe_link(network, tmp_path / "probe")
    assert measured["rtt_s"] >= 0.01
    assert measured["client_to_server_bit_s"] <= 200e6 * 1.2


@needs_root
def test_namespaces_shape_and_delay(tmp_path):
    with EmulatedNetwork(WAN_LIKE, tmp_path) as network:
        assert network.mode == NAMESPACES
        assert len(_namespaces_of(os.getpid())) == 2
        measured = probe_link(network, tmp_path / "probe")
    assert measured["rtt_s"] >= WAN_LIKE.rtt_s
    # tbf's burst lets a little more through at first; 20% covers it for a 4 MiB transfer.
    assert measured["client_to_server_bit_s"] <= WAN_LIKE.bandwidth_bit_s * 1.2
    assert measured["server_to_client_bit_s"] <= WAN_LIKE.bandwidth_bit_s * 1.2
    assert _namespaces_of(os.getpid()) == []


@needs_root
def test_cleanup_after_exception(tmp_path):
    sleeper_pids = []
    with pytest.raises(RuntimeError, match="boom"), EmulatedNetwork(WAN_LIKE, tmp_path) as network:
        for role in ("server", "client"):
            sleeper = network.spawn(role, ["sleep", "600"], tmp_path / f"{role}.log")
            sleeper_pids.append(sleeper.pid)
        assert len(_namespaces_of(os.getpid())) == 2
        raise RuntimeError("boom")
    assert _namespaces_of(os.getpid()) == []
    for pid in sleeper_pids:
        assert not _alive(pid), f"process {pid} outlived the network"
    for device in network.veth.values():
        assert not Path(f"/sys/class/net/{device}").exists()


# A bench-like program: builds the network, starts a process in each namespace, prints their
# PIDs and waits to be interrupted, with the same SIGTERM handling as 'cipherprompt bench'.
_INTERRUPTED_RUN = textwrap.dedent("""
    import math, signal, sys, time
    from pathlib import Path
    from cipherprompt.bench.compare import _exit_on_signal
    from cipherprompt.bench.estimate import Network
    from cipherprompt.bench.network import EmulatedNetwork

    signal.signal(signal.SIGTERM, _exit_on_signal)
    work = Path(sys.argv[1])
    with EmulatedNetwork(Network("custom", 50e6, 0.02), work) as network:
        endpoints = network.endpoints(1)
        network.start_relay(endpoints, work / "relay.json", work / "relay.log")
        pids = [network.spawn(role, ["sleep", "600"], None).pid for role in ("server", "client")]
        print("ready", *pids, flush=True)
        time.sleep(600)
""")


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cleanup_after_signal(tmp_path, signum):
    # NOTE: in one full-suite run the SIGINT case did not exit within 60 s. Reruns took about
    # 1 s. The cause is not known.
    process = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN, str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("ready"), process.stderr.read()
        pids = [int(token) for token in line.split()[1:]]
        assert len(_namespaces_of(process.pid)) == 2
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert _namespaces_of(process.pid) == []
    for pid in pids:
        assert not _alive(pid), f"process {pid} outlived the interrupted run"
    # The relay is a process of the run too: nothing with the run's relay command is left.
    leftover = subprocess.run(["pgrep", "-f", f"--stats-file {tmp_path}/relay.json"],
                              check=False, capture_output=True, text=True).stdout.split()
    assert leftover == []


@needs_root
def test_setup_failure_removes_namespaces(tmp_path, monkeypatch):
    # The kernel rejects a tbf of rate 0, so the set-up fails half-way. The run falls back to the
    # relay and leaves no namespace or veth end behind.
    monkeypatch.setattr("cipherprompt.bench.network.tbf_parameters",
                        lambda rate: {"rate_bit_s": 0, "burst_bytes": 0, "limit_bytes": 0})
    with EmulatedNetwork(WAN_LIKE, tmp_path) as network:
        assert network.mode == RELAY_ON_LOOPBACK
        assert "tc" in network.fallback_reason
        assert _namespaces_of(os.getpid()) == []
    for device in network.veth.values():
        assert not Path(f"/sys/class/net/{device}").exists()


def test_stop_kills_process_group(tmp_path):
    with EmulatedNetwork(Network("loopback", math.inf, 0.0), tmp_path) as network:
        # A shell whose child ignores SIGTERM: stop() must still end both.
        popen = network.spawn("server", ["sh", "-c", "trap '' TERM; sleep 600 & wait"], None)
        time.sleep(0.3)
        started = time.monotonic()
        network.stop(popen, timeout_s=1.0)
        assert time.monotonic() - started < 30
    assert popen.poll() is not None
    # SIGKILL is delivered at once, but a killed orphan may show for a moment until it is reaped.
    deadline = time.monotonic() + 10
    while (left := _group_members(popen.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "the shell's child outlived stop()"


def _group_members(pgid: int) -> list[int]:
    listing = subprocess.run(["pgrep", "-g", str(pgid)], check=False, capture_output=True,
                             text=True).stdout
    return [int(pid) for pid in listing.split() if _alive(int(pid))]
