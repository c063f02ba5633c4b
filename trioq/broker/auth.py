"""Who may connect, and as what.

Tokens are random, high-entropy strings; only their SHA-256 is kept at rest,
and a presented token is compared against every stored hash in constant time.
Roles: ``producer`` < ``worker`` are separate; ``admin`` may act as either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path

import attrs

from ..job import is_printable_name

log = logging.getLogger("trioq.broker")

ROLES = ("producer", "worker", "admin")

#: What each credential role may open a session as.
MAY_ACT_AS = {
    "producer": {"producer"},
    "worker": {"worker"},
    "admin": {"producer", "worker", "admin"},
}

ENV_TOKENS = {
    "TRIOQ_ADMIN_TOKEN": "admin",
    "TRIOQ_PRODUCER_TOKEN": "producer",
    "TRIOQ_WORKER_TOKEN": "worker",
}


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "tq_" + secrets.token_urlsafe(32)


@attrs.frozen
class Credential:
    name: str
    role: str
    hash: str


@attrs.define
class Authenticator:
    """Checks HELLO tokens; ``open`` when nothing is configured (loopback only)."""

    credentials: list[Credential] = attrs.Factory(list)
    #: mutual TLS authenticates instead: the role comes from the client certificate
    client_certs: bool = False

    @property
    def open(self) -> bool:
        """Nobody is asked who they are: every session may do everything."""
        return not self.credentials and not self.client_certs

    def check(self, token: str | None) -> Credential | None:
        if token is None or not isinstance(token, str) or len(token) > 512:
            return None
        presented = hash_token(token)
        found: Credential | None = None
        for cred in self.credentials:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(presented, cred.hash):
                found = cred
        return found

    @classmethod
    def load(cls, auth_file: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Authenticator:
        env = os.environ if env is None else env
        creds: list[Credential] = []
        if auth_file is not None and Path(auth_file).exists():
            mode = stat.S_IMODE(Path(auth_file).stat().st_mode)
            if mode & 0o022:
                log.warning("%s is writable by other users (mode %o): whoever can write it can add tokens", auth_file, mode)
            creds.extend(read_auth_file(auth_file))
        for var, role in ENV_TOKENS.items():
            value = env.get(var)
            if value:
                creds.append(Credential(f"env:{var}", role, hash_token(value)))
        return cls(creds)


class AuthFileError(ValueError):
    pass


def check_credential_name(name: str) -> None:
    """A credential's name becomes its jobs' owner and goes into logs: printable, bounded
    (as HELLO names are), so it cannot forge log lines."""
    if not is_printable_name(name):
        raise AuthFileError(f"a token name must be 1-200 printable characters, not {name[:50]!r}")


def read_auth_file(path: str | os.PathLike[str]) -> list[Credential]:
    """One JSON object a line: {"name", "role", "hash"}; errors name the line."""
    creds = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            d = json.loads(line)
            cred = Credential(str(d["name"]), str(d["role"]), str(d["hash"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthFileError(f"{path}:{n}: not a token entry ({exc})") from None
        if cred.role not in ROLES:
            raise AuthFileError(f"{path}:{n}: unknown role {cred.role!r} (expected one of {ROLES})")
        try:
            check_credential_name(cred.name)
        except AuthFileError as exc:
            raise AuthFileError(f"{path}:{n}: {exc}") from None
        if not cred.hash.startswith("sha256:"):
            raise AuthFileError(f"{path}:{n}: hash must start with 'sha256:'")
        creds.append(cred)
    return creds


def add_token(path: str | os.PathLike[str], role: str, name: str | None = None) -> tuple[str, Credential]:
    """Create a token, append its hash to the file (0600), return the token once."""
    if role not in ROLES:
        raise AuthFileError(f"unknown role {role!r} (expected one of {ROLES})")
    if name is not None:
        check_credential_name(name)
    token = new_token()
    cred = Credential(name or f"{role}-{secrets.token_hex(3)}", role, hash_token(token))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        entry = {"name": cred.name, "role": role, "hash": cred.hash, "created": time.time()}
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)
    return token, cred


def fingerprint(token: str | None) -> str:
    """What a log may say about a token: a short hash that tells tokens apart and gives away
    none of the token itself (its first characters would)."""
    if not token:
        return "<none>"
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:10]
