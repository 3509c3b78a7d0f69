"""Certificates and credentials for one test cluster, made fresh per cluster."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UNPRIVILEGED_USER = "alice"
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


@dataclass(frozen=True)
class Credentials:
    """Paths of everything the components and clients need."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    controller_manager_cert: Path
    controller_manager_key: Path
    scheduler_cert: Path
    scheduler_key: Path
    service_account_key: Path
    service_account_pub: Path
    token_file: Path
    unprivileged_token: str
    kubelet_client_cert: Path
    kubelet_client_key: Path


@dataclass(frozen=True)
class NodeCredentials:
    """A kubelet's client certificate (Node authorization: ``system:node:<name>`` in
    ``system:nodes``) and its serving certificate (for the node's address)."""

    client_cert: Path
    client_key: Path
    serving_cert: Path
    serving_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_names: tuple[str, ...] = (),
    server_ips: tuple[str, ...] = (),
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names or server_ips else []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names or server_ips:
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def create(folder: Path) -> Credentials:
    """A CA, the apiserver's serving cert, client certs, a service-account key pair and a
    token file with one unprivileged user."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("ascend-testcluster-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _pem(folder / "ca.crt", ca)
    _write_key(folder / "ca.key", ca_key)

    def issue(stem: str, subject: x509.Name, **kwargs: object) -> tuple[Path, Path]:
        key = _key()
        cert = _cert(subject, key, ca_name, ca_key, **kwargs)  # type: ignore[arg-type]
        _pem(folder / f"{stem}.crt", cert)
        _write_key(folder / f"{stem}.key", key)
        return folder / f"{stem}.crt", folder / f"{stem}.key"

    serving = issue(
        "apiserver",
        _name("kube-apiserver"),
        server_names=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        server_ips=("127.0.0.1", "10.0.0.1"),
    )
    admin = issue("admin", _name("ascend-admin", "system:masters"), client=True)
    controller_manager = issue(
        "controller-manager", _name("system:kube-controller-manager"), client=True
    )
    scheduler = issue("scheduler", _name("system:kube-scheduler"), client=True)
    # The API server's identity towards kubelets (logs, exec): the built-in RBAC role
    # system:kubelet-api-admin is bound to it by the cluster.
    kubelet_client = issue("apiserver-kubelet-client", _name(KUBELET_CLIENT_USER), client=True)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(folder / "sa.key", sa_key)
    (folder / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = secrets.token_hex(24)
    (folder / "tokens.csv").write_text(f"{token},{UNPRIVILEGED_USER},{UNPRIVILEGED_USER}-uid\n")
    return Credentials(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        serving_cert=serving[0],
        serving_key=serving[1],
        admin_cert=admin[0],
        admin_key=admin[1],
        controller_manager_cert=controller_manager[0],
        controller_manager_key=controller_manager[1],
        scheduler_cert=scheduler[0],
        scheduler_key=scheduler[1],
        service_account_key=folder / "sa.key",
        service_account_pub=folder / "sa.pub",
        token_file=folder / "tokens.csv",
        unprivileged_token=token,
        kubelet_client_cert=kubelet_client[0],
        kubelet_client_key=kubelet_client[1],
    )


def node(folder: Path, name: str, address: str) -> NodeCredentials:
    """Client and serving certificates for node ``name`` at ``address``, signed by the CA
    that ``create(folder)`` made."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()).subject
    paths: list[Path] = []
    for stem, subject, kwargs in (
        (f"node-{name}-client", _name(f"system:node:{name}", "system:nodes"), {"client": True}),
        (
            f"node-{name}-serving",
            _name(f"system:node:{name}", "system:nodes"),
            {"server_names": (name,), "server_ips": (address,)},
        ),
    ):
        key = _key()
        cert = _cert(subject, key, ca_name, ca_key, **kwargs)  # type: ignore[arg-type]
        _pem(folder / f"{stem}.crt", cert)
        _write_key(folder / f"{stem}.key", key)
        paths += [folder / f"{stem}.crt", folder / f"{stem}.key"]
    return NodeCredentials(*paths)


def kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    user: str,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a kubeconfig with one cluster, user and context."""
    import json

    credentials: dict[str, str] = {}
    if cert and key:
        credentials = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        credentials = {"token": token}
    context: dict[str, str] = {"cluster": "ascend-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "ascend-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    path.chmod(0o600)
    return path
