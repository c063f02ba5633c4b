"""A small private CA, the broker's certificate, client certificates, SSL contexts.

Keys are written 0600 before any byte of them is written (no window in which
another user could read them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import ssl
import stat
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("trioq.tls")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@attrs.frozen
class CertPaths:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str]) -> CertPaths:
        d = Path(directory)
        return cls(d, d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)

    def exist(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.ca_key, self.server_cert, self.server_key))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def check_san(name: str) -> None:
    """An IP address or a DNS name (a leading ``*.`` allowed): an empty or malformed name
    would be written into the certificate, where clients cannot match it."""
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{name!r} is neither an IP address nor a DNS name")


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        check_san(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def create_ca(paths: CertPaths, *, days: int = 3650) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trioq local CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths.dir.mkdir(parents=True, exist_ok=True)
    _write_private(paths.ca_key, _key_pem(key))
    _write_public(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    return ca_cert, ca_key  # type: ignore[return-value]


def issue_certificate(
    paths: CertPaths,
    common_name: str,
    cert_path: Path,
    key_path: Path,
    *,
    sans: list[str] | None = None,
    server: bool = True,
    role: str | None = None,
    days: int = 825,
) -> x509.Certificate:
    """Sign a leaf certificate with the project CA; ``role`` goes in the OU."""
    ca_cert, ca_key = _load_ca(paths)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs_ = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if role:
        attrs_.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs_))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def create_server_cert(paths: CertPaths, extra_sans: list[str] | tuple[str, ...] = ()) -> None:
    sans = list(dict.fromkeys([*DEFAULT_SANS, *extra_sans]))
    issue_certificate(paths, "trioq broker", paths.server_cert, paths.server_key, sans=sans)


def warn_if_readable(*secrets: Path) -> None:
    """Secrets (keys, tokens) other local users can read get a warning at every start: they
    are made 0600, but a copy or a chmod may have changed that."""
    for path in secrets:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warning("%s is readable by other users (mode %o); it should be 0600", path, mode)


def ensure_certs(directory: str | os.PathLike[str], sans: list[str] | tuple[str, ...] = ()) -> tuple[CertPaths, bool]:
    """Create the CA and server certificate if missing; returns (paths, created).

    Serving needs no CA key, so it may be kept elsewhere; but a CA certificate is never
    replaced behind the clients' backs: without its key, a missing server certificate is an error.
    """
    paths = CertPaths.in_dir(directory)
    if paths.ca_cert.exists() and paths.server_cert.exists() and paths.server_key.exists():
        warn_if_readable(paths.server_key, paths.ca_key)
        return paths, False
    if paths.ca_cert.exists() and not paths.ca_key.exists():
        raise FileNotFoundError(
            f"{paths.dir} has a CA certificate but not its key ({paths.ca_key.name}): "
            "issue the server certificate where the CA key is kept, or remove ca.pem to start a new CA"
        )
    if not paths.ca_cert.exists():
        create_ca(paths)
    create_server_cert(paths, sans)
    return paths, True


def issue_client_cert(directory: str | os.PathLike[str], name: str, role: str) -> tuple[Path, Path]:
    paths = CertPaths.in_dir(directory)
    if not (paths.ca_cert.exists() and paths.ca_key.exists()):
        raise FileNotFoundError(f"no CA in {paths.dir}: run 'trioq certs' first")
    cert_path = paths.dir / f"client-{name}.pem"
    key_path = paths.dir / f"client-{name}.key"
    issue_certificate(paths, name, cert_path, key_path, server=False, role=role)
    return cert_path, key_path


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(
    paths: CertPaths,
    *,
    min_version: str = "1.3",
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[min_version]
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(paths.ca_cert)
    return ctx


def client_context(
    ca_cert: str | os.PathLike[str] | None,
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Verifies the broker against ``ca_cert`` (or the system store), hostname included."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def describe_certificate(path: str | os.PathLike[str]) -> dict[str, object]:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sans": sans,
    }


def role_from_peer_cert(der: bytes | None) -> tuple[str | None, str | None]:
    """(common name, role) of a verified client certificate."""
    if not der:
        return None, None
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else None, str(ou[0].value) if ou else None)
