"""Removing secrets from what goes into the audit log.

An audit entry is kept forever and exported as evidence, so nothing secret may reach
it. Two nets catch secrets: by *name* (a details key such as ``password``,
``api_key`` or ``Authorization`` has its whole value replaced) and by *shape* (a
string anywhere that contains one of our API keys ``rqm_…``, a bearer token, a JWT or
a URL with a password has that part replaced). No library offers this pairing for
our own key format, hence the few rules below.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from pathlib import PurePath
from typing import Any
from uuid import UUID

REDACTED = "[redacted]"

# A name is split into lower-case words (snake, kebab, camel); it is secret when one
# of its words contains one of these stems, or when its last word is "key"/"keys"
# (api_key, x-api-key, private_key) — key_id and key_prefix name a key, not hold one.
_SECRET_STEMS = (
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "authorization",
    "cookie",
    "apikey",
    "privatekey",
)
_SECRET_WORDS = frozenset({"pwd", "pass", "auth"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

_SECRET_VALUES = (
    # "Bearer <token>" as in an Authorization header. (Basic credentials are caught
    # by the header's name; as a value, "basic <word>" is too often plain English.)
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{8,}"),
    # Our API keys (the 12-character display prefix is not secret and stays).
    re.compile(r"rqm_[A-Za-z0-9_\-]{20,}"),
    # JSON Web Tokens: three base64url parts, the first two always start with eyJ.
    re.compile(r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"),
)
# Cheap first look: most strings contain none of these, and skip the rules.
_TRIGGER = re.compile(r"rqm_|eyJ|(?i:bearer)|://")
# scheme://user:password@host — keep the user and host, drop the password.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s@/]+@")


@lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """True if a details key named ``name`` holds a secret."""
    words = [w.lower() for w in _WORD.findall(name)]
    if not words:
        return False
    if words[-1] in ("key", "keys"):
        return True
    joined = "".join(words)
    if any(stem in joined for stem in _SECRET_STEMS):
        return True
    return any(w in _SECRET_WORDS for w in words)


def scrub_text(text: str) -> str:
    """``text`` with every secret-shaped part replaced by ``[redacted]``."""
    if _TRIGGER.search(text) is None:
        return text
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    for pattern in _SECRET_VALUES:
        text = pattern.sub(REDACTED, text)
    return text


def scrub(value: Any) -> Any:
    """A copy of ``value`` (JSON-like) with secrets removed, recursively.

    Decimals, times, UUIDs, paths and enums become their text; anything else that
    JSON cannot hold is left for the canonical encoder to refuse.
    """
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {
            str(k): REDACTED if is_secret_name(str(k)) else scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if isinstance(value, Enum):
        return scrub(value.value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID | PurePath):
        return scrub_text(str(value))
    return value
