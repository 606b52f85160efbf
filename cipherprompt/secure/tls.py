"""TLS for the control connection and for SPU's link, and a helper that makes test certificates.

Authentication is mutual: each party presents a certificate signed by one CA and checks the
peer's certificate against it. The client needs a certificate anyway, because SPU's brpc link
runs a TLS server in each party. The client also checks that the server's certificate names
the host it dialled (control connection only). Health probes may come without a client
certificate, because a probe learns only what every client may learn.

SPU's link (brpc, in spu 0.9.5) checks the peer's certificate chain against the CA but not
the host name, so use a CA that signs certificates for cipherprompt parties only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import spu.libspu as libspu

log = logging.getLogger(__name__)

# Maximum certificate chain depth SPU's link accepts: leaf, intermediates and root.
LINK_VERIFY_DEPTH = 4

CERTIFICATE_FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one party: its certificate and key, and the CA that signs the peer's."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "a TLS certificate needs its private key and the reverse; pass both "
                "--tls-cert and --tls-key"
            )
        for option, path in (("--tls-ca", self.ca), ("--tls-cert", self.cert),
                             ("--tls-key", self.key)):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(
                    f"{option} file {path} is missing or unreadable; make certificates with "
                    "'cipherprompt make-certs --out DIR' or fix the path"
                )

    @property
    def has_certificate(self) -> bool:
        return self.cert is not None


def _load_identity(context: ssl.SSLContext, files: TLSFiles) -> None:
    try:
        context.load_verify_locations(cafile=str(files.ca))
    except ssl.SSLError as error:
        raise ValueError(f"--tls-ca {files.ca} is not a PEM CA certificate ({error})") from error
    if files.cert is None:
        return
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
    except ssl.SSLError as error:
        raise ValueError(
            f"TLS certificate {files.cert} and key {files.key} cannot be loaded together "
            f"({error.reason or error}); check that the key belongs to the certificate"
        ) from error


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """TLS context for the server's control port; sessions must present a client certificate."""
    if not files.has_certificate:
        raise ValueError("a TLS server needs --tls-cert and --tls-key besides --tls-ca")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Optional here, so health probes work without a certificate; the server rejects any
    # session whose client presented none (see ModelServer).
    context.verify_mode = ssl.CERT_OPTIONAL
    _load_identity(context, files)
    return context


def client_context(files: TLSFiles) -> ssl.SSLContext:
    """TLS context for a client: checks the server's certificate and host name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, files)
    return context


def configure_link(desc: libspu.link.Desc, files: TLSFiles) -> None:
    """Turn on TLS for SPU's link in both directions, with this party's certificate."""
    if not files.has_certificate:
        raise ValueError("TLS on SPU's link needs this party's --tls-cert and --tls-key")
    desc.enable_ssl = True
    for options in (desc.client_ssl_opts, desc.server_ssl_opts):
        options.cert.certificate_path = str(files.cert)
        options.cert.private_key_path = str(files.key)
        options.verify.ca_file_path = str(files.ca)
        # brpc turns verification off at depth 0.
        options.verify.verify_depth = LINK_VERIFY_DEPTH


def peer_subject(sock: ssl.SSLSocket) -> str | None:
    """Return the common name of the peer's verified certificate, or None when it sent none."""
    certificate = sock.getpeercert()
    if not certificate:
        return None
    for entry in certificate.get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return value
    return ""


def _openssl(arguments: list[str], cwd: Path) -> None:
    result = subprocess.run(["openssl", *arguments], cwd=cwd, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"openssl {arguments[0]} failed with exit status {result.returncode}: "
            f"{result.stderr.strip()[-500:]}"
        )


def make_certificates(out_dir: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                      days: int = 365, force: bool = False) -> list[Path]:
    """Write a CA, a server and a client certificate with their keys (PEM) into ``out_dir``.

    The server certificate names ``hosts`` (DNS names or IP addresses). Both leaf certificates
    allow server and client use, because each party's SPU link acts as both. Keys are P-256 and
    readable by the owner only. Uses the ``openssl`` command.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError(
            "the openssl command is not on PATH; install it (Debian: apt-get install openssl) "
            "or make the certificates with another tool as docs/operations.md describes"
        )
    if not 1 <= days <= 3650:
        raise ValueError(f"days must be in 1..3650, got {days}")
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [name for name in CERTIFICATE_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise ValueError(
            f"{out_dir} already contains {', '.join(existing)}; choose another --out or "
            "pass --force to replace them"
        )
    names = [f"IP:{host}" if _is_ip_address(host) else f"DNS:{host}" for host in hosts]
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    with tempfile.TemporaryDirectory(prefix="cipherprompt-certs-") as scratch:
        work = Path(scratch)
        old_umask = os.umask(0o077)
        try:
            _openssl(["req", "-x509", *key_options, "-keyout", "ca.key", "-out", "ca.crt",
                      "-days", str(days), "-subj", "/CN=cipherprompt CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign"], work)
            for role, alt_names in (("server", names), ("client", [])):
                extensions = [
                    "basicConstraints=critical,CA:FALSE",
                    "keyUsage=critical,digitalSignature,keyEncipherment",
                    "extendedKeyUsage=serverAuth,clientAuth",
                ]
                if alt_names:
                    extensions.append("subjectAltName=" + ",".join(alt_names))
                (work / f"{role}.ext").write_text("\n".join(extensions) + "\n")
                _openssl(["req", *key_options, "-keyout", f"{role}.key", "-out", f"{role}.csr",
                          "-subj", f"/CN=cipherprompt {role}"], work)
                _openssl(["x509", "-req", "-in", f"{role}.csr", "-CA", "ca.crt", "-CAkey",
                          "ca.key", "-CAcreateserial", "-out", f"{role}.crt", "-days",
                          str(days), "-extfile", f"{role}.ext"], work)
        finally:
            os.umask(old_umask)
        written = []
        for name in CERTIFICATE_FILES:
            target = out_dir / name
            shutil.copyfile(work / name, target)
            os.chmod(target, 0o600 if name.endswith(".key") else 0o644)
            written.append(target)
    log.info("wrote a CA, a server and a client certificate to %s (server names: %s)",
             out_dir, ", ".join(hosts))
    return written


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
