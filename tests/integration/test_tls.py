"""The server over HTTPS (``--tls-cert``/``--tls-key``) and the client
trusting a given certificate (``verify=``), never an unknown one."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from megafs.errors import InvalidRequest, RemoteError
from megafs.remote import RemoteClient
from megafs.wire import MAX_CHUNK_BYTES
from tests.helpers.server import ServerProcess, running_server
from tests.integration.users import Creds


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (cert, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "megafs test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    cert, key = self_signed(tmp_path)
    with running_server(
        tmp_path / "data", args=("--tls-cert", str(cert), "--tls-key", str(key))
    ) as srv:
        yield srv, cert


async def test_https_with_a_trusted_certificate(tls_server: tuple[ServerProcess, Path]) -> None:
    server, cert = tls_server
    assert server.url.startswith("https://127.0.0.1:")
    async with RemoteClient(server.url, verify=str(cert)) as client:
        assert await client.health()
        creds = Creds.random()
        await creds.signup(client)
        assert (await client.account()).email == creds.email
        # A chunk both ways: a large body through TLS, on kept-alive connections.
        data = os.urandom(MAX_CHUNK_BYTES)
        for chunk_id in (bytes(32), bytes(31) + b"\x01"):
            await client.put_chunk(chunk_id, data)
            assert await client.get_chunk(chunk_id) == data


async def test_an_unknown_certificate_is_refused(tls_server: tuple[ServerProcess, Path]) -> None:
    server, _ = tls_server
    async with RemoteClient(server.url, retries=0) as client:
        with pytest.raises(RemoteError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.health()
    with pytest.raises(InvalidRequest):
        RemoteClient(server.url, verify=False)


def test_tls_start_errors(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    cases = [
        (["--tls-cert", str(cert)], 2, "go together"),
        (
            ["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", str(key)],
            1,
            "cannot use the TLS certificate",
        ),
        (
            ["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.pem")],
            1,
            "cannot use the TLS certificate",
        ),
    ]
    for args, code, message in cases:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "megafs.server",
                "--data",
                str(tmp_path / "d"),
                "--listen",
                "127.0.0.1:0",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, proc.stderr
        assert len(lines) == 1 and message in lines[0], proc.stderr
