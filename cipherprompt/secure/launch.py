"""Start ``cipherprompt serve`` as a child process on 127.0.0.1 and stop it reliably."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cipherprompt.secure.tls import TLSFiles, client_context
from cipherprompt.secure.wire import free_port, parse_address, recv_message, send_message

log = logging.getLogger(__name__)


def check_health(address: str, timeout_s: float = 10.0, tls: TLSFiles | None = None) -> dict:
    """Ask the server at ``address`` for its status; raise OSError when it does not reply.

    A TLS server accepts a probe without a client certificate; ``tls`` needs only the CA.
    """
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        connection = raw
        if tls is not None:
            connection = client_context(tls).wrap_socket(raw, server_hostname=host)
        try:
            connection.settimeout(timeout_s)
            send_message(connection, "health")
            return recv_message(connection, "health").payload
        finally:
            connection.close()


class ServerProcess:
    """A server child process; a context manager that waits until it listens, then stops it.

    The server's output goes to ``work_dir/server.log``. On exit the process gets SIGTERM, and
    SIGKILL if it has not stopped within 30 s, also when the body raised.
    """

    def __init__(self, checkpoint: Path, work_dir: Path, port: int = 0,
                 extra_args: tuple[str, ...] = (), start_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None, health_tls: TLSFiles | None = None,
                 command: str = "serve", model_option: str = "--checkpoint"):
        self.checkpoint = Path(checkpoint)
        # The CLI command that serves the checkpoint: "serve", or "serve-decoder" for a decoder,
        # and its option that names the model file ("--gguf" for a decoder's GGUF file).
        self.command = command
        self.model_option = model_option
        self.work_dir = Path(work_dir)
        self.port = port or free_port("127.0.0.1")
        self.extra_args = extra_args
        self.start_timeout_s = start_timeout_s
        # Variables added to this process's environment for the server.
        self.env = env
        # CA for the readiness probe of a TLS server.
        self.health_tls = health_tls
        self.log_path = self.work_dir / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "cipherprompt", self.command, self.model_option,
                   str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port),
                   "--work-dir", str(self.work_dir), *self.extra_args]
        log.info("starting the server process on %s (log: %s)", self.address, self.log_path)
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as server_log:
            self.process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT,
                                            env=env)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server process exited with code "
                                   f"{self.process.returncode}; see {self.log_path}")
            try:
                check_health(self.address, timeout_s=5.0, tls=self.health_tls)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the server did not listen on {self.address} within "
                           f"{self.start_timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
