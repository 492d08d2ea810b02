"""TLS and mutual TLS on the shared server bootstrap, with certificates made for the test."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import ServiceBinding
from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread


def _issue(folder: Path, name: str, issuer: tuple[object, object] | None = None):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca_cert, ca_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def _check(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # type: ignore[no-any-return]


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca = _issue(tmp_path, "ca")
    _issue(tmp_path, "server", ca)
    _issue(tmp_path, "client", ca)
    noop = ServiceBinding(name="tlm.none.v1.NoneService", register=lambda server: None)
    tls = {"tls_cert_file": tmp_path / "server.crt", "tls_key_file": tmp_path / "server.key"}
    root = (tmp_path / "ca.crt").read_bytes()
    settings = ServerSettings(host="localhost", port=0, insecure_dev=True, **tls)  # type: ignore[arg-type]
    with ServerThread(lambda: [noop], settings) as server:
        assert _check(server.address, grpc.ssl_channel_credentials(root)) == 1  # SERVING
        with pytest.raises(grpc.RpcError):
            _check(server.address, None)  # plaintext to a TLS port fails
    mutual = ServerSettings(
        host="localhost",
        port=0,
        insecure_dev=True,
        tls_client_ca_file=tmp_path / "ca.crt",
        **tls,  # type: ignore[arg-type]
    )
    with ServerThread(lambda: [noop], mutual) as server:
        client = grpc.ssl_channel_credentials(
            root, (tmp_path / "client.key").read_bytes(), (tmp_path / "client.crt").read_bytes()
        )
        assert _check(server.address, client) == 1
        with pytest.raises(grpc.RpcError):
            _check(server.address, grpc.ssl_channel_credentials(root))  # no client certificate


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ServerSettings(tls_cert_file=tmp_path / "x.crt")
