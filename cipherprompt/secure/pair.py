"""Both parties of one SPU session as two child processes on 127.0.0.1, driven by this process.

The profiler and the operator benchmark need the real traffic between a server party (rank 0)
and a client party (rank 1), but none of the control protocol of ``serve`` and ``classify``.
``PartyPair`` starts each party in its own process, joined by SPU's link on loopback. It sends
both parties the data to infeed and the key of the compiled program to run, and collects the
cost that each party parses from its own SPU profile. Each party gets only its own data: the owner of a secret
infeeds its value and the other party a zero placeholder, as in a real session.

``cipherprompt bench`` (``bench/runner.py``) starts its parties differently: each runs a fixed
model program for a number of queries from a spec file, inside its own network namespace. The
pair here serves callers that run several programs in one session and check each output.

The children are started with ``spawn``, not ``fork``. SPU's logger can be set up only once
per process, and a forked child would inherit a logger that an earlier session in this process
routed elsewhere. Its profile lines would then mix with the other party's.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from cipherprompt.secure.cost import QueryCost
from cipherprompt.secure.engine import (
    CLIENT_RANK,
    SERVER_RANK,
    CompiledModel,
    EngineConfig,
    Stage,
)
from cipherprompt.secure.wire import free_port

log = logging.getLogger(__name__)

ROLES = {SERVER_RANK: "server", CLIENT_RANK: "client"}
# Seconds both parties may take to start Python, reach each other and set up SPU's runtime.
_START_TIMEOUT_S = 300.0
# Seconds each party may take to stop its link after a clean run.
_CLOSE_TIMEOUT_S = 30.0


class PartyError(RuntimeError):
    """A party process failed or exited. The message names the party and its SPU log."""


@dataclass
class PairCost:
    """Cost of one program run as each party's SPU profile reports it."""

    client: QueryCost
    server: QueryCost


@dataclass
class _PartyTask:
    """Inputs of a party process, pickled into the spawned child."""

    rank: int
    server_link: str
    client_link: str
    engine: EngineConfig
    link_timeout_s: float
    spu_log: Path
    # Program key -> stages as plain data, because SPU's executables do not pickle.
    programs: dict[str, list[dict]]


def _stage_to_data(stage: Stage) -> dict:
    executable = stage.executable
    data = {field.name: getattr(stage, field.name) for field in fields(stage)}
    data["executable"] = {"name": executable.name, "input_names": list(executable.input_names),
                          "output_names": list(executable.output_names),
                          "code": executable.code}
    return data


def _stage_from_data(data: dict) -> Stage:
    import spu.libspu as libspu

    return Stage(**{**data, "executable": libspu.Executable(**data["executable"])})


class PartyPair:
    """A server party and a client party in two child processes, used as a context manager.

    ``programs`` maps a key to a compiled program that ``run`` can run by that key. Entering
    starts both processes and waits until their SPU runtimes are set up. Leaving stops them,
    and kills them when the body raised (including on Ctrl-C).
    """

    def __init__(self, programs: dict[str, CompiledModel], engine: EngineConfig, work_dir: Path,
                 link_timeout_s: float = 600.0):
        self.programs = programs
        self.engine = engine
        self.work_dir = Path(work_dir)
        self.link_timeout_s = link_timeout_s
        self._processes: dict[int, multiprocessing.Process] = {}
        self._connections: dict[int, Connection] = {}
        self.setup_seconds = 0.0

    def spu_log(self, rank: int) -> Path:
        return self.work_dir / f"spu-{ROLES[rank]}.log"

    def __enter__(self) -> PartyPair:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        data = {key: [_stage_to_data(stage) for stage in program.stages]
                for key, program in self.programs.items()}
        links = {rank: f"127.0.0.1:{free_port('127.0.0.1')}" for rank in ROLES}
        context = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        try:
            for rank in ROLES:
                task = _PartyTask(rank, links[SERVER_RANK], links[CLIENT_RANK], self.engine,
                                  self.link_timeout_s, self.spu_log(rank), data)
                ours, theirs = context.Pipe()
                process = context.Process(target=_party_main, args=(task, theirs),
                                          name=f"cipherprompt-{ROLES[rank]}-party", daemon=True)
                process.start()
                theirs.close()
                self._processes[rank], self._connections[rank] = process, ours
            for rank in ROLES:
                self._receive(rank, "ready", timeout_s=_START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        self.setup_seconds = time.perf_counter() - started
        return self

    def __exit__(self, exc_type, exc, traceback_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    # -- commands ------------------------------------------------------------------------------

    def set_secret(self, name: str, value: np.ndarray, owner: int) -> None:
        """Infeed ``value`` at its owner and a zero placeholder of its shape at the other party."""
        value = np.ascontiguousarray(value, np.float32)
        for rank in ROLES:
            payload = value if rank == owner else None
            self._send(rank, {"op": "set", "name": name, "value": payload,
                              "shape": value.shape, "owner": owner})
        for rank in ROLES:
            self._receive(rank, "ok")

    def set_secrets(self, values: dict[str, np.ndarray], owner: int) -> None:
        for name, value in values.items():
            self.set_secret(name, value, owner)

    def run(self, key: str,
            on_stage: Callable[[int, int, str], None] | None = None) -> PairCost:
        """Run program ``key`` at both parties. ``on_stage(index, total, name)`` reports progress."""
        if key not in self.programs:
            raise KeyError(f"unknown program {key!r}; valid keys: {', '.join(self.programs)}")
        for rank in ROLES:
            self._send(rank, {"op": "run", "program": key, "progress": rank == CLIENT_RANK})
        while True:
            message = self._receive(CLIENT_RANK, ("stage", "done"))
            if message["event"] == "done":
                client = message["cost"]
                break
            if on_stage is not None:
                on_stage(message["index"], message["total"], message["name"])
        server = self._receive(SERVER_RANK, "done")["cost"]
        return PairCost(client, server)

    def reveal(self, name: str) -> np.ndarray:
        """Send the server's share of ``name`` to the client party; return the reconstructed value."""
        self._send(SERVER_RANK, {"op": "share", "name": name})
        blobs = self._receive(SERVER_RANK, "share")["blobs"]
        self._send(CLIENT_RANK, {"op": "reconstruct", "name": name, "blobs": blobs})
        return self._receive(CLIENT_RANK, "value")["value"]

    def delete(self, names: list[str]) -> None:
        for rank in ROLES:
            self._send(rank, {"op": "delete", "names": list(names)})
        for rank in ROLES:
            self._receive(rank, "ok")

    def close(self) -> None:
        """Stop both links, wait for the processes and kill any process that does not end."""
        try:
            for rank in ROLES:
                self._send(rank, {"op": "close"})
            for rank in ROLES:
                self._receive(rank, "closed", timeout_s=_CLOSE_TIMEOUT_S)
        except PartyError as error:
            log.warning("closing the party processes failed: %s", error)
        finally:
            self.kill()

    def kill(self) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.join(timeout=0.5)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections.values():
            connection.close()
        self._processes.clear()
        self._connections.clear()

    # -- pipe ----------------------------------------------------------------------------------

    def _send(self, rank: int, message: dict) -> None:
        try:
            self._connections[rank].send(message)
        except (OSError, KeyError) as error:
            raise self._party_error(rank, f"sending to it failed ({error})") from None

    def _receive(self, rank: int, expected: str | tuple[str, ...],
                 timeout_s: float | None = None) -> dict:
        """Wait for the next event of party ``rank``. Raises PartyError when the party fails."""
        connection, process = self._connections[rank], self._processes[rank]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not connection.poll(0.5):
            if not process.is_alive():
                raise self._party_error(rank, f"it exited with status {process.exitcode}")
            if deadline is not None and time.monotonic() > deadline:
                raise self._party_error(rank, f"it did not reply within {timeout_s:g} s")
        try:
            message = connection.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            raise self._party_error(rank, f"it exited with status {process.exitcode}") from None
        if message.get("event") == "error":
            log.debug("the %s party's traceback:\n%s", ROLES[rank], message.get("traceback"))
            raise self._party_error(rank, message["error"])
        allowed = (expected,) if isinstance(expected, str) else expected
        if message.get("event") not in allowed:
            raise self._party_error(rank, f"expected {' or '.join(allowed)}, got {message!r}")
        return message

    def _party_error(self, rank: int, reason: str) -> PartyError:
        return PartyError(f"the {ROLES[rank]} party failed: {reason}; "
                          f"see SPU's log {self.spu_log(rank)}")


# -- the party process ----------------------------------------------------------------------------


def _party_main(task: _PartyTask, connection: Connection) -> None:
    """Entry point of a party process: set up SPU, then serve commands until ``close``."""
    from cipherprompt.secure.worker import die_with_parent

    # The driving process handles Ctrl-C and kills the parties.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(multiprocessing.parent_process().pid)
    try:
        _serve_commands(task, connection)
    except Exception as error:  # the driver must always learn why a party stopped
        try:
            connection.send({"event": "error", "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()})
        except OSError:
            pass  # the driver is gone, and die_with_parent ends this process


def _serve_commands(task: _PartyTask, connection: Connection) -> None:
    from cipherprompt.secure.party import (
        LinkOptions,
        SecureParty,
        share_from_blobs,
        share_to_blobs,
    )

    programs = {key: CompiledModel([_stage_from_data(stage) for stage in stages], "")
                for key, stages in task.programs.items()}
    party = SecureParty(task.rank, task.server_link, task.client_link, task.engine,
                        task.spu_log, LinkOptions(timeout_s=task.link_timeout_s))
    connection.send({"event": "ready"})
    while True:
        command = connection.recv()
        op = command["op"]
        if op == "set":
            value = command["value"]
            if value is None:
                value = np.zeros(command["shape"], np.float32)
            party.set_secret(command["name"], value, command["owner"])
            connection.send({"event": "ok"})
        elif op == "run":
            on_stage = None
            if command["progress"]:
                def on_stage(index, total, name):
                    connection.send({"event": "stage", "index": index, "total": total,
                                     "name": name})
            cost = party.run(programs[command["program"]], on_stage=on_stage)
            connection.send({"event": "done", "cost": cost})
        elif op == "share":
            blobs = share_to_blobs(party.runtime.get_var(command["name"]))
            connection.send({"event": "share", "blobs": blobs})
        elif op == "reconstruct":
            own = party.runtime.get_var(command["name"])
            value = party.reconstruct(own, share_from_blobs(command["blobs"]))
            connection.send({"event": "value", "value": value})
        elif op == "delete":
            for name in command["names"]:
                party.runtime.del_var(name)
            connection.send({"event": "ok"})
        elif op == "close":
            party.close()
            connection.send({"event": "closed"})
            return
        else:
            raise ValueError(f"unknown command {op!r}")
