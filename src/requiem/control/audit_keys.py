"""The audit log's signing key and what a signed checkpoint says.

A checkpoint is the service's Ed25519 signature over one sequence number and the
chain's hash at that number. Whoever keeps a checkpoint can later prove that history
up to it was not rewritten, even by someone able to recompute every hash, because
recomputing a signature needs the private key, which never leaves
``REQUIEM_AUDIT_KEY_FILE`` (created 0600 on first use).

The signed message is ``b"ckpt:"`` followed by the RFC 8785 JSON of
``{"head_hash", "key_id", "seq", "signed_at"}``; ``key_id`` is the BLAKE3 of the raw
32-byte public key.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from requiem import digest
from requiem.errors import InvalidInput, Unavailable

ALGORITHM = "Ed25519"


class AuditKeyUnavailable(Unavailable):
    code = "audit_key_unavailable"


class AuditPublicKeyInvalid(InvalidInput):
    code = "audit_public_key_invalid"


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the chain's hash at ``seq`` was ``head_hash``."""

    seq: int
    head_hash: str
    signed_at: str
    key_id: str
    signature: str  # base64

    def message(self) -> bytes:
        return signed_message(self.seq, self.head_hash, self.signed_at, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "head_hash": self.head_hash,
            "signed_at": self.signed_at,
            "key_id": self.key_id,
            "signature": self.signature,
            "algorithm": ALGORITHM,
        }


def signed_message(seq: int, head_hash: str, signed_at: str, key_id: str) -> bytes:
    body = {
        "head_hash": head_hash,
        "key_id": key_id,
        "seq": seq,
        "signed_at": signed_at,
    }
    return b"ckpt:" + digest.canonical_json(body)


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return digest.of_bytes(raw)


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def parse_public_pem(text: str) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM ``text``; ``audit_public_key_invalid`` if not."""
    try:
        key = serialization.load_pem_public_key(text.encode("utf-8"))
    except (ValueError, TypeError, UnicodeError) as exc:
        msg = "public key is not a PEM-encoded key"
        raise AuditPublicKeyInvalid(msg) from exc
    if not isinstance(key, Ed25519PublicKey):
        msg = "public key is not an Ed25519 key"
        raise AuditPublicKeyInvalid(msg)
    return key


def signature_valid(public_key: Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    """True if ``checkpoint`` was signed by the holder of ``public_key``."""
    if checkpoint.key_id != key_id_of(public_key):
        return False
    try:
        raw = base64.b64decode(checkpoint.signature, validate=True)
        public_key.verify(raw, checkpoint.message())
    except (InvalidSignature, ValueError):
        return False
    return True


class AuditSigner:
    """The service's private checkpoint key, loaded from (or created at) a file."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def load(cls, path: Path, *, create: bool = True) -> AuditSigner:
        """The key at ``path``; created 0600 (directory 0700) when missing."""
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            if not create:
                msg = f"no audit signing key at {path}"
                raise AuditKeyUnavailable(msg, path=str(path)) from None
            pem = _create_key_file(path)
        except OSError as exc:
            msg = f"cannot read the audit signing key at {path}: {exc.strerror}"
            raise AuditKeyUnavailable(msg, path=str(path)) from exc
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            msg = f"the audit signing key at {path} is not a PEM private key"
            raise AuditKeyUnavailable(msg, path=str(path)) from exc
        if not isinstance(key, Ed25519PrivateKey):
            msg = f"the audit signing key at {path} is not an Ed25519 key"
            raise AuditKeyUnavailable(msg, path=str(path))
        return cls(key)

    def sign(self, seq: int, head_hash: str, signed_at: str) -> Checkpoint:
        message = signed_message(seq, head_hash, signed_at, self.key_id)
        signature = base64.b64encode(self._private.sign(message)).decode("ascii")
        return Checkpoint(seq, head_hash, signed_at, self.key_id, signature)

    def public_pem(self) -> str:
        return public_pem(self.public_key)


def _create_key_file(path: Path) -> bytes:
    """Write a new key to ``path`` atomically; if another process won, use theirs."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(pem)
                stream.flush()
                os.fsync(stream.fileno())
            # link() fails if the name exists, so two processes cannot both win.
            os.link(temp, path)
        except FileExistsError:
            return path.read_bytes()
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        msg = f"cannot create the audit signing key at {path}: {exc.strerror}"
        raise AuditKeyUnavailable(msg, path=str(path)) from exc
    return pem
