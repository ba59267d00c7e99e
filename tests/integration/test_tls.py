"""MQTT over TLS: the broker's TLS listener, the service, the simulator and a partner through it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import secrets
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.app import OwnerApp, Policy
from firmware_sim.module import Module
from firmware_sim.partner import PartnerListener, Received
from service import app, brokeradmin, localstack
from service.config import Settings
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER

STATION = (51.302300, 0.401450)


@dataclass(frozen=True)
class Pki:
    """A self-signed CA and a server certificate it signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path, server_names: tuple[str, ...] = ("localhost",)) -> Pki:
    """Write a CA and a server certificate for `localhost` and 127.0.0.1 into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"ChargeShare test CA {secrets.token_hex(3)}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_names[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key.chmod(0o600)
    return pki


@dataclass
class TlsBroker:
    """A broker of this module's own with a plain and a TLS listener."""

    broker: localstack.Broker
    files: brokeradmin.BrokerFiles
    pki: Pki
    owners: dict[str, str]
    partners: dict[str, str]

    @property
    def tls_port(self) -> int:
        assert self.broker.tls_port is not None
        return self.broker.tls_port

    def account(self, kind: str) -> tuple[str, str]:
        """Create an owner or partner account and make the broker reread its files."""
        name, password = f"{kind}{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        (self.owners if kind == "owner" else self.partners)[name] = password
        self.files.set_password(name, password)
        self.files.write_acl(SERVICE_USER, self.owners, self.partners)
        self.files.reload()
        return name, password


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Start Mosquitto with the project's settings, a plain and a TLS listener (test CA)."""
    d = tmp_path_factory.mktemp("tls-broker")
    pki = make_pki(d / "certs")
    b = localstack.Broker(d / "broker", localstack.free_port(), localstack.free_port())
    files = brokeradmin.BrokerFiles(b.directory, b.pid_file)
    files.set_password(SERVICE_USER, SERVICE_PASSWORD)
    files.write_acl(SERVICE_USER, [], [])
    proc = localstack.start_broker(b, tls=(pki.ca, pki.cert, pki.key))
    yield TlsBroker(b, files, pki, {}, {})
    localstack.stop_broker(proc)


def _connects(port: int, user: str, password: str, ca: Path) -> bool:
    """Tell whether paho connects over TLS trusting `ca` and gets a CONNACK."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{secrets.token_hex(4)}")
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=str(ca))
    c.connect("127.0.0.1", port, keepalive=10)
    try:
        for _ in range(100):  # the CONNACK arrives on one of the next loop turns
            c.loop(timeout=0.1)
            if c.is_connected():
                return True
        return False
    finally:
        c.disconnect()


def _handshake(port: int, ca: Path) -> str:
    """Do a TLS handshake trusting `ca`; return "ok" or the name of the error."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return "ok"
        except ssl.SSLError as exc:
            return type(exc).__name__


def test_tls_listener_needs_a_trusted_certificate_chain(tls_broker: TlsBroker) -> None:
    """A client trusting the CA logs in over TLS; one trusting another CA fails the handshake."""
    user, password = tls_broker.account("owner")
    assert _connects(tls_broker.tls_port, user, password, tls_broker.pki.ca)
    assert _handshake(tls_broker.tls_port, tls_broker.pki.ca) == "ok"
    other = make_pki(tls_broker.broker.directory.parent / f"other-{secrets.token_hex(2)}")
    assert _handshake(tls_broker.tls_port, other.ca) == "SSLCertVerificationError"


def test_plain_mqtt_is_not_spoken_on_the_tls_port(tls_broker: TlsBroker) -> None:
    """A plain MQTT CONNECT sent to the TLS listener gets no CONNACK."""
    with socket.create_connection(("127.0.0.1", tls_broker.tls_port), timeout=5) as s:
        # MQTT 3.1.1 CONNECT without credentials: a plaintext broker would answer 0x20 0x02 ...
        s.sendall(bytes([0x10, 0x0C, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
        try:
            reply = s.recv(4)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"\x20")


async def test_story_over_tls(tls_broker: TlsBroker, database_url: str) -> None:
    """Vehicle, app, service and partner all on the TLS listener: the partner sees the start."""
    owner, owner_pw = tls_broker.account("owner")
    partner, partner_pw = tls_broker.account("partner")
    port, ca = tls_broker.tls_port, str(tls_broker.pki.ca)
    tag = secrets.token_hex(3)
    settings = Settings(
        database_url=database_url,
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        mqtt_username=SERVICE_USER,
        mqtt_password=SERVICE_PASSWORD,
        mqtt_tls_ca=ca,
        client_id=f"svc-tls-{tag}",
        share_group=f"tls{tag}",
        session_expiry_s=60,
        location_secret=b"test-location-secret-0123456789",
        settle_s=0.3,
    )
    listener = PartnerListener(partner, partner_pw, port=port, tls_ca=ca)
    phone = OwnerApp(owner, owner_pw, port=port, vehicle="rt1", answer=Policy("always"), tls_ca=ca)
    module = Module(owner, "rt1", owner_pw, port=port, tls_ca=ca)
    async with app.running(settings, api_enabled=False):
        await asyncio.to_thread(listener.connect)
        await asyncio.to_thread(phone.connect)
        try:
            phone.opt_in(nickname="Jimbo")
            opted = await asyncio.to_thread(
                phone.wait_for, lambda s: s.kind == "status" and bool(s.status and s.status.enabled)
            )
            assert opted is not None, phone.log
            await asyncio.to_thread(module.connect)
            module.plug_in(*STATION)

            def started(r: Received) -> bool:
                return r.event is not None and r.event.type == "session.started"

            got = await asyncio.to_thread(listener.wait_for, started, 20.0)
            assert got is not None, [(s.kind, s.raw) for s in phone.log]
            assert got.event is not None
            assert got.event.session.contributor == "Jimbo"
            assert any(s.kind == "answered" for s in phone.log)
        finally:
            module.disconnect()
            phone.close()
            listener.close()
