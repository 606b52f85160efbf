"""Emulated networks for benchmarks: each party in its own network namespace, on a shaped link.

With namespaces (root, or CAP_NET_ADMIN) a run creates this, and removes it at the end:

    server namespace                                  client namespace
    10.77.0.1 (veth, tbf) <------- veth pair -------> 10.77.0.2 (veth, tbf)
    party 0 listens on 10.77.0.1:P                    party 1 listens on 127.0.0.1:Q
                                                      delay relay: 10.77.0.2:R -> 127.0.0.1:Q
                                                                   127.0.0.1:S -> 10.77.0.1:P

``tc tbf`` on each veth end limits the bandwidth leaving it. The delay relay (``relay.py``) adds
half the round-trip time in each direction, because the ``netem`` qdisc may be missing. Every
byte between the parties crosses the veth pair once, in its own direction, so it is shaped
once. The addresses exist only inside the two namespaces, which no other process uses.

Without namespaces the run falls back to the relay alone on 127.0.0.1: it adds the delay and
paces each connection to the bandwidth in user space, and the report states it.

Namespaces, veth ends and processes carry the run's PID in their names
(``cipherprompt-bench-PID-server``), so leftovers of a killed run can be told apart. The
cleanup runs with SIGINT, SIGTERM and SIGHUP blocked, so a second Ctrl-C cannot cut it short.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cipherprompt.bench.estimate import Network
from cipherprompt.secure.wire import free_port

log = logging.getLogger(__name__)

SERVER_ADDRESS = "10.77.0.1"
CLIENT_ADDRESS = "10.77.0.2"
_PREFIX_LENGTH = 30
NAMESPACE_PREFIX = "cipherprompt-bench-"
_NAMESPACE_PATTERN = re.compile(re.escape(NAMESPACE_PREFIX) + r"(\d+)-(server|client)$")
# Ports inside the namespaces. Slot k uses _BASE_PORT + 10 k + 0..3, so that the parties of a
# later plan never meet sockets of an earlier one that are still closing.
_BASE_PORT = 17000
# tc-tbf(8) sizes the burst as at least rate / HZ, the tokens of one timer tick. 4 ms covers
# HZ=250 and above, and the burst is at least one 64 KiB GSO packet. The queue has room for
# 50 ms at full rate, and tbf drops packets beyond that, as a router does.
_TBF_TICK_S = 0.004
_TBF_MIN_BURST = 64 << 10
_TBF_QUEUE_S = 0.05
_STOP_TIMEOUT_S = 10.0

LOOPBACK = "loopback"
NAMESPACES = "namespaces"
RELAY_ON_LOOPBACK = "relay on 127.0.0.1"


def tbf_parameters(bandwidth_bit_s: float) -> dict[str, int]:
    """Return the tbf rate (bit/s), burst and queue limit (bytes) for a bandwidth."""
    rate_bytes = bandwidth_bit_s / 8
    burst = max(_TBF_MIN_BURST, int(rate_bytes * _TBF_TICK_S))
    return {"rate_bit_s": int(bandwidth_bit_s), "burst_bytes": burst,
            "limit_bytes": max(2 * burst, int(rate_bytes * _TBF_QUEUE_S))}


@dataclass(frozen=True)
class Endpoints:
    """Addresses of one two-party session: where each party listens and whom it dials."""

    server_listen: str
    client_listen: str
    # The address the server's link dials to reach the client, and the reverse; a relay's
    # address when the run adds latency.
    server_dials: str
    client_dials: str
    # Relay routes as LISTEN=TARGET; empty without a relay.
    relay_routes: tuple[str, ...] = ()

    def server_party_list(self) -> tuple[str, str]:
        """Return (server entry, client entry) of the link's party list for the server."""
        return self.server_listen, self.server_dials

    def client_party_list(self) -> tuple[str, str]:
        """Return (server entry, client entry) of the link's party list for the client."""
        return self.client_dials, self.client_listen


@dataclass
class _Process:
    popen: subprocess.Popen
    name: str
    log_path: Path | None


def _run(command: list[str]) -> None:
    """Run an ``ip`` or ``tc`` command; raise RuntimeError with its message when it fails."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as error:
        raise RuntimeError(f"{command[0]} not found ({error})") from None
    except subprocess.CalledProcessError as error:
        message = (error.stderr or error.stdout or "").strip().splitlines()
        raise RuntimeError(f"'{' '.join(command)}' failed: "
                           f"{message[-1] if message else f'exit status {error.returncode}'}"
                           ) from None


def list_namespaces() -> list[str]:
    """Return the names of the network namespaces that ``ip netns list`` prints."""
    try:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def stale_namespaces() -> list[str]:
    """Return benchmark namespaces whose run (the PID in the name) no longer exists."""
    stale = []
    for name in list_namespaces():
        match = _NAMESPACE_PATTERN.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            stale.append(name)
    return stale


class EmulatedNetwork:
    """Place the two parties of a benchmark on ``network``; a context manager that cleans up.

    ``use_namespaces=False`` skips the namespaces and uses the relay on 127.0.0.1 (the fallback
    when namespaces cannot be created). ``force_relay`` routes the parties through the relay
    even when the round-trip time is 0, to measure the relay's own overhead.
    """

    def __init__(self, network: Network, work_dir: Path, use_namespaces: bool = True,
                 force_relay: bool = False):
        self.network = network
        self.work_dir = Path(work_dir)
        self.use_namespaces = use_namespaces
        self.force_relay = force_relay
        self.pid = os.getpid()
        self.namespaces = {
            "server": f"{NAMESPACE_PREFIX}{self.pid}-server",
            "client": f"{NAMESPACE_PREFIX}{self.pid}-client",
        }
        self.veth = {"server": f"cpb{self.pid}s", "client": f"cpb{self.pid}c"}
        self.mode = LOOPBACK
        self.fallback_reason: str | None = None
        self._created_namespaces: list[str] = []
        self._processes: list[_Process] = []
        self._cleaned = False

    # -- set-up -------------------------------------------------------------------------------

    @property
    def shaped(self) -> bool:
        return not math.isinf(self.network.bandwidth_bit_s)

    @property
    def uses_relay(self) -> bool:
        return self.network.rtt_s > 0 or self.force_relay or (
            self.shaped and self.mode == RELAY_ON_LOOPBACK)

    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    def setup(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for name in stale_namespaces():
            log.warning("network namespace %s is left over from an earlier run that no longer "
                        "exists; remove it with 'ip netns del %s'", name, name)
        if self.network.name == LOOPBACK:
            # The relay's own overhead is measured against a direct run on the same loopback.
            self.mode = RELAY_ON_LOOPBACK if self.force_relay else LOOPBACK
            return
        if not self.use_namespaces:
            self._fall_back("namespaces turned off (--no-namespaces)")
            return
        try:
            self._create_namespaces()
            self.mode = NAMESPACES
        except RuntimeError as error:
            self._remove_namespaces()
            self._fall_back(str(error))

    def _fall_back(self, reason: str) -> None:
        self.mode = RELAY_ON_LOOPBACK
        self.fallback_reason = reason
        log.warning("no network namespaces (%s): the parties run on 127.0.0.1 behind the delay "
                    "relay, which also paces the bandwidth in user space", reason)

    def _create_namespaces(self) -> None:
        if os.geteuid() != 0:
            log.info("not root: creating network namespaces needs CAP_NET_ADMIN; trying anyway")
        for role in ("server", "client"):
            _run(["ip", "netns", "add", self.namespaces[role]])
            self._created_namespaces.append(self.namespaces[role])
        _run(["ip", "link", "add", self.veth["server"], "type", "veth", "peer", "name",
              self.veth["client"]])
        addresses = {"server": SERVER_ADDRESS, "client": CLIENT_ADDRESS}
        for role in ("server", "client"):
            namespace, device = self.namespaces[role], self.veth[role]
            _run(["ip", "link", "set", device, "netns", namespace])
            _run(["ip", "-n", namespace, "addr", "add", f"{addresses[role]}/{_PREFIX_LENGTH}",
                  "dev", device])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            _run(["ip", "-n", namespace, "link", "set", device, "up"])
            if self.shaped:
                tbf = tbf_parameters(self.network.bandwidth_bit_s)
                _run(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
                      "rate", f"{tbf['rate_bit_s']}bit", "burst", str(tbf["burst_bytes"]),
                      "limit", str(tbf["limit_bytes"])])
        log.info("network namespaces %s and %s joined by a veth pair%s", self.namespaces["server"],
                 self.namespaces["client"],
                 f", tbf {self.network.describe()}" if self.shaped else "")

    # -- addresses and processes -------------------------------------------------------------

    def endpoints(self, slot: int) -> Endpoints:
        """Return the addresses for session number ``slot`` (one per plan) of this run."""
        if self.mode == NAMESPACES:
            base = _BASE_PORT + 10 * slot
            server_listen = f"{SERVER_ADDRESS}:{base}"
            if not self.uses_relay:
                client_listen = f"{CLIENT_ADDRESS}:{base + 1}"
                return Endpoints(server_listen, client_listen, client_listen, server_listen)
            client_listen = f"127.0.0.1:{base + 1}"
            server_dials = f"{CLIENT_ADDRESS}:{base + 2}"
            client_dials = f"127.0.0.1:{base + 3}"
        else:
            server_listen = f"127.0.0.1:{free_port('127.0.0.1')}"
            client_listen = f"127.0.0.1:{free_port('127.0.0.1')}"
            if not self.uses_relay:
                return Endpoints(server_listen, client_listen, client_listen, server_listen)
            server_dials = f"127.0.0.1:{free_port('127.0.0.1')}"
            client_dials = f"127.0.0.1:{free_port('127.0.0.1')}"
        return Endpoints(server_listen, client_listen, server_dials, client_dials,
                         (f"{server_dials}={client_listen}", f"{client_dials}={server_listen}"))

    def command_in(self, role: str, command: list[str]) -> list[str]:
        """Prefix ``command`` so that it runs in ``role``'s namespace (server, client, relay)."""
        if self.mode != NAMESPACES:
            return list(command)
        namespace = self.namespaces["server" if role == "server" else "client"]
        return ["ip", "netns", "exec", namespace, *command]

    def spawn(self, role: str, command: list[str], log_path: Path | None,
              stdout_pipe: bool = False) -> subprocess.Popen:
        """Start ``command`` in ``role``'s namespace in its own process group; it is tracked."""
        log_target = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                self.command_in(role, command),
                stdout=subprocess.PIPE if stdout_pipe else log_target, stderr=log_target,
                start_new_session=True, text=stdout_pipe or None,
            )
        finally:
            # The child has its own copy of the descriptor.
            if log_path is not None:
                log_target.close()
        self._processes.append(_Process(popen, f"{role}: {' '.join(command[:4])}", log_path))
        return popen

    def start_relay(self, endpoints: Endpoints, stats_file: Path, log_path: Path
                    ) -> subprocess.Popen | None:
        """Start the delay relay for ``endpoints``; return None when the run needs no relay."""
        if not endpoints.relay_routes:
            return None
        command = [sys.executable, "-m", "cipherprompt.bench.relay",
                   "--delay-ms", f"{self.network.rtt_s * 1000 / 2:g}",
                   "--stats-file", str(stats_file)]
        for route in endpoints.relay_routes:
            command += ["--route", route]
        if self.mode == RELAY_ON_LOOPBACK and self.shaped:
            command += ["--rate-mbit", f"{self.network.bandwidth_bit_s / 1e6:g}"]
        relay = self.spawn("relay", command, log_path, stdout_pipe=True)
        line = relay.stdout.readline()
        if not line.startswith("relay ready"):
            relay.wait(timeout=_STOP_TIMEOUT_S)
            raise RuntimeError(f"the delay relay did not start (exit status {relay.returncode});"
                               f" see {log_path}")
        return relay

    def stop(self, popen: subprocess.Popen, timeout_s: float = _STOP_TIMEOUT_S) -> int:
        """Send SIGTERM to ``popen``'s process group, then SIGKILL after ``timeout_s``."""
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()
        return popen.returncode

    # -- clean-up ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop every process this run started and remove its namespaces; safe to call twice."""
        if self._cleaned:
            return
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for process in reversed(self._processes):
                self.stop(process.popen)
            self._remove_namespaces()
            self._cleaned = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _remove_namespaces(self) -> None:
        for namespace in list(self._created_namespaces):
            # Processes left inside (a party's child, say) would keep the namespace alive.
            for pid in _namespace_pids(namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                _run(["ip", "netns", "del", namespace])
                self._created_namespaces.remove(namespace)
            except RuntimeError as error:
                log.error("removing network namespace %s failed: %s; remove it with "
                          "'ip netns del %s'", namespace, error, namespace)
        # A veth end still in this namespace (set-up failed before moving it) is removed here;
        # deleting one end removes its peer.
        for device in self.veth.values():
            if Path(f"/sys/class/net/{device}").exists():
                try:
                    _run(["ip", "link", "del", device])
                except RuntimeError as error:
                    log.error("removing veth %s failed: %s", device, error)

    # -- report ------------------------------------------------------------------------------

    def describe(self) -> dict:
        """Return the network's settings and how they were emulated, for the JSON record."""
        description = {
            "preset": self.network.name,
            "bandwidth_bit_s": None if not self.shaped else self.network.bandwidth_bit_s,
            "rtt_s": self.network.rtt_s,
            "emulation": self.mode,
            "fallback_reason": self.fallback_reason,
            "relay": None,
            "tbf": None,
        }
        if self.mode == NAMESPACES:
            description["namespaces"] = dict(self.namespaces)
            description["addresses"] = {"server": SERVER_ADDRESS, "client": CLIENT_ADDRESS}
            if self.shaped:
                description["tbf"] = tbf_parameters(self.network.bandwidth_bit_s)
        if self.uses_relay:
            description["relay"] = {
                "one_way_delay_s": self.network.rtt_s / 2,
                "paced_rate_bit_s": (self.network.bandwidth_bit_s
                                     if self.mode == RELAY_ON_LOOPBACK and self.shaped else None),
            }
        return description


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _namespace_pids(namespace: str) -> list[int]:
    try:
        listing = subprocess.run(["ip", "netns", "pids", namespace], check=False,
                                 capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(token) for token in listing.split() if token.isdigit()]


@dataclass
class WaitResult:
    """Exit statuses of processes waited on together; ``timed_out`` when the limit ran out."""

    returncodes: dict[str, int | None] = field(default_factory=dict)
    timed_out: bool = False


def wait_all(processes: dict[str, subprocess.Popen], timeout_s: float,
             failure_grace_s: float = 30.0) -> WaitResult:
    """Wait until every process exits, or ``timeout_s`` passes.

    When one exits with a non-zero status, the others get ``failure_grace_s`` to end on their
    own, because a party whose peer died fails once its link times out. The caller stops the
    processes still running after that.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = {name: popen.poll() for name, popen in processes.items()}
        if all(code is not None for code in codes.values()):
            return WaitResult(codes)
        if any(code not in (None, 0) for code in codes.values()):
            deadline = min(deadline, time.monotonic() + failure_grace_s)
        time.sleep(0.2)
    return WaitResult({name: popen.poll() for name, popen in processes.items()}, timed_out=True)
