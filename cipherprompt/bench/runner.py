"""Run one two-party session of a benchmark: the server and client processes on an emulated link.

Each party runs ``cipherprompt.bench.party`` in its own process, and in its own network
namespace where the run has them. So the seconds, bytes and memory of each process are those of
a deployment with the parties on two hosts, except that here both share one machine's CPU.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from cipherprompt.bench.network import EmulatedNetwork, wait_all
from cipherprompt.bench.party import ModelSpec, PartySpec
from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK

log = logging.getLogger(__name__)

# Seeds of each party's part of a random first-layer input. The harness uses both only to
# compute the plaintext output that it compares the private output with.
HIDDEN_SEEDS = {SERVER_RANK: 101, CLIENT_RANK: 202}
_LOG_TAIL_LINES = 15
# Seconds each way that the link probe transfers at the emulated bandwidth (at most 64 MiB).
_PROBE_SECONDS = 1.0
_PROBE_MAX_BYTES = 64 << 20
_PROBE_MIN_BYTES = 4 << 20


class SessionError(RuntimeError):
    """A party process failed or timed out; the message names it and ends with its log."""


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def run_session(network: EmulatedNetwork, slot: int, model: ModelSpec, max_len: int,
                engine: dict, queries: int, inputs: Path, work_dir: Path,
                link_timeout_s: float, timeout_s: float) -> dict:
    """Run ``queries`` queries of ``model`` between two party processes; return both records.

    Raises SessionError when a party fails or the session takes longer than ``timeout_s``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    endpoints = network.endpoints(slot)
    processes, records = {}, {}
    relay_stats = work_dir / "relay-stats.json"
    relay = network.start_relay(endpoints, relay_stats, work_dir / "relay.log")
    try:
        for rank, role in ((SERVER_RANK, "server"), (CLIENT_RANK, "client")):
            party_dir = work_dir / role
            party_dir.mkdir(exist_ok=True)
            server_entry, client_entry = (endpoints.server_party_list() if rank == SERVER_RANK
                                          else endpoints.client_party_list())
            spec = PartySpec(rank=rank, server_link=server_entry, client_link=client_entry,
                             model=model, max_len=max_len, engine=engine, queries=queries,
                             link_timeout_s=link_timeout_s,
                             inputs=str(inputs) if rank == CLIENT_RANK else None,
                             hidden_seed=HIDDEN_SEEDS[rank], work_dir=str(party_dir))
            spec_path = party_dir / "spec.json"
            spec_path.write_text(spec.to_json())
            command = [sys.executable, "-m", "cipherprompt.bench.party", str(spec_path),
                       str(party_dir / "result.json")]
            processes[role] = network.spawn(role, command, party_dir / "party.log")
        outcome = wait_all(processes, timeout_s)
        failed = {role: code for role, code in outcome.returncodes.items() if code != 0}
        if outcome.timed_out or failed:
            for popen in processes.values():
                network.stop(popen)
            what = (f"the session did not finish within {timeout_s:.0f} s" if outcome.timed_out
                    else "a party process failed")
            details = "\n".join(
                f"-- {role} (exit status {outcome.returncodes[role]}), "
                f"{work_dir / role / 'party.log'}:\n{_log_tail(work_dir / role / 'party.log')}"
                for role in processes)
            raise SessionError(f"{what}\n{details}")
        for role in processes:
            records[role] = json.loads((work_dir / role / "result.json").read_text())
    finally:
        if relay is not None:
            network.stop(relay)
    if relay is not None and relay_stats.exists():
        records["relay"] = json.loads(relay_stats.read_text())
    return records


def probe_link(network: EmulatedNetwork, work_dir: Path) -> dict:
    """Measure the round-trip time and throughput that the emulated link delivers.

    The probe runs from the client's namespace to the server's, along the path the parties use.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    endpoints = network.endpoints(0)
    bandwidth = network.network.bandwidth_bit_s
    transfer = _PROBE_MAX_BYTES if math.isinf(bandwidth) else int(
        min(_PROBE_MAX_BYTES, max(_PROBE_MIN_BYTES, bandwidth / 8 * _PROBE_SECONDS)))
    relay = network.start_relay(endpoints, work_dir / "probe-relay-stats.json",
                                work_dir / "probe-relay.log")
    server = client = None
    try:
        server = network.spawn("server", [sys.executable, "-m", "cipherprompt.bench.probe",
                                          "serve", "--listen", endpoints.server_listen],
                               work_dir / "probe-server.log", stdout_pipe=True)
        if not server.stdout.readline().startswith("probe ready"):
            raise RuntimeError(f"the link probe's server did not start; see "
                               f"{work_dir / 'probe-server.log'}")
        client = network.spawn("client", [sys.executable, "-m", "cipherprompt.bench.probe",
                                          "measure", "--connect", endpoints.client_dials,
                                          "--bytes", str(transfer)],
                               work_dir / "probe-client.log", stdout_pipe=True)
        output, _ = client.communicate(timeout=600)
        if client.returncode != 0:
            raise RuntimeError(f"the link probe failed (exit status {client.returncode}); see "
                               f"{work_dir / 'probe-client.log'}")
        return json.loads(output.strip().splitlines()[-1])
    finally:
        for popen in (client, server, relay):
            if popen is not None:
                network.stop(popen)
