"""Mutual TLS on the control connection and SPU's link, and ``cipherprompt make-certs``."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
from secure_helpers import (
    SHORT_TEXT,
    assert_no_tracebacks,
    make_tiny_checkpoint,
    no_active_sessions,
    wait_for,
    wait_for_log,
)

from cipherprompt.secure.client import HandshakeError, PrivateClassifier
from cipherprompt.secure.launch import ServerProcess, check_health
from cipherprompt.secure.tls import TLSFiles, make_certificates
from cipherprompt.secure.wire import PROTOCOL_VERSION, PeerError, recv_message, send_message

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder)
    other = tmp_path_factory.mktemp("other-ca")
    make_certificates(other)
    return folder, other


@pytest.fixture(scope="module")
def server(certificates, tmp_path_factory):
    folder, _ = certificates
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.npz")[0]
    arguments = ("--tls-ca", str(folder / "ca.crt"), "--tls-cert", str(folder / "server.crt"),
                 "--tls-key", str(folder / "server.key"))
    with ServerProcess(checkpoint, tmp_path_factory.mktemp("server"), extra_args=arguments,
                       start_timeout_s=300, health_tls=TLSFiles(folder / "ca.crt")) as process:
        yield process


def _client_files(folder, ca_folder=None) -> TLSFiles:
    return TLSFiles((ca_folder or folder) / "ca.crt", folder / "client.crt", folder / "client.key")


def _assert_serving(server, ca) -> None:
    assert server.process.poll() is None
    assert_no_tracebacks(server.log_path)
    tls = TLSFiles(ca)
    wait_for(lambda: no_active_sessions(server.address, tls=tls), 60, "the session to end")
    assert check_health(server.address, tls=tls)["status"] == "serving"


def test_make_certs_files(certificates):
    folder, _ = certificates
    for name in ("ca.crt", "server.crt", "client.crt"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644
    for name in ("ca.key", "server.key", "client.key"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(folder / "ca.crt"),
                               str(folder / "server.crt"), str(folder / "client.crt")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stderr


def test_make_certs_rejects_overwrite(certificates):
    folder, _ = certificates
    with pytest.raises(ValueError, match="already contains ca.crt"):
        make_certificates(folder)


def test_tls_query(server, certificates, tmp_path):
    folder, _ = certificates
    with PrivateClassifier(server.address, work_dir=tmp_path,
                           tls=_client_files(folder)) as client:
        assert client.classify(SHORT_TEXT).label in (0, 1)
    wait_for_log(server.log_path, 'client_certificate="cipherprompt client"')
    _assert_serving(server, folder / "ca.crt")


def test_health_over_tls(server, certificates):
    folder, _ = certificates
    status = check_health(server.address, tls=TLSFiles(folder / "ca.crt"))
    assert status["tls"] is True


def test_cli_health_over_tls(server, certificates):
    folder, _ = certificates
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "health", "--server", server.address,
         "--tls-ca", str(folder / "ca.crt"), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["status"] == "serving"
    assert status["tls"] is True
    assert status["sessions"] == []


def test_plain_client_rejected(server, certificates, tmp_path):
    folder, _ = certificates
    with pytest.raises(HandshakeError, match="this server requires TLS"):
        PrivateClassifier(server.address, work_dir=tmp_path).connect()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        send_message(sock, "hello", {"protocol_version": PROTOCOL_VERSION})
        with pytest.raises(PeerError, match="requires TLS"):
            recv_message(sock, "welcome")
    wait_for_log(server.log_path, "it did not start TLS")
    _assert_serving(server, folder / "ca.crt")


def test_client_with_other_ca_rejected(server, certificates, tmp_path):
    folder, other = certificates
    # The server's certificate does not verify against another CA.
    with pytest.raises(HandshakeError, match="does not verify"):
        PrivateClassifier(server.address, work_dir=tmp_path,
                          tls=_client_files(other)).connect()
    # A client certificate from another CA is rejected by the server.
    with pytest.raises(HandshakeError, match="TLS handshake"):
        PrivateClassifier(server.address, work_dir=tmp_path,
                          tls=_client_files(other, ca_folder=folder)).connect()
    wait_for_log(server.log_path, "TLS handshake with")
    _assert_serving(server, folder / "ca.crt")


def test_client_without_certificate_rejected(server, certificates, tmp_path):
    folder, _ = certificates
    with pytest.raises(HandshakeError, match="requires a client certificate"):
        PrivateClassifier(server.address, work_dir=tmp_path,
                          tls=TLSFiles(folder / "ca.crt")).connect()
    _assert_serving(server, folder / "ca.crt")


def test_serve_rejects_mismatched_key(certificates, tmp_path):
    folder, _ = certificates
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "serve", "--checkpoint",
         str(tmp_path / "unused.npz"), "--tls-ca", str(folder / "ca.crt"), "--tls-cert",
         str(folder / "server.crt"), "--tls-key", str(folder / "client.key")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    assert "cannot be loaded together" in result.stderr


def test_serve_needs_certificate_and_key(certificates, tmp_path):
    folder, _ = certificates
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "serve", "--tls-ca", str(folder / "ca.crt")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    assert "--tls-cert and --tls-key" in result.stderr


def test_cli_make_certs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "make-certs", "--out", str(tmp_path / "certs"),
         "--host", "inference.example", "--host", "10.0.0.5"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                           str(tmp_path / "certs" / "server.crt")],
                          capture_output=True, text=True, check=False).stdout
    assert "DNS:inference.example" in text
    assert "IP Address:10.0.0.5" in text
