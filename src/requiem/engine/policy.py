"""Policy decisions taken before anything runs: which env keys pass, and strictness.

The child's environment starts empty. From the request's ``env`` a key survives only
if ``env_allow`` (when given) matches it, ``env_deny`` does not, it does not look
like a secret, and the engine does not set it itself. Patterns are shell globs
matched without regard to case (``LC_*``, ``*_TOKEN``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from requiem.engine.errors import EnvRequiredMissing, SandboxUnavailable
from requiem.engine.models import ExecutionRequest, Policy

# Names that carry credentials by convention. Matched on the upper-cased name, so
# ``github_token`` is caught as well as ``GITHUB_TOKEN``.
SECRET_PATTERNS = (
    "*TOKEN",
    "*TOKEN_*",
    "*SECRET",
    "*SECRET_*",
    "SECRET*",
    "*_KEY",
    "*_KEYS",
    "*_KEY_*",
    "*PRIVATE_KEY*",
    "*APIKEY*",
    "*PASSWORD*",
    "*PASSWD*",
    "*PASSPHRASE*",
    "*_PASS",
    "PGPASS*",
    "*_PWD",
    "*_PAT",
    "*JWT*",
    "BEARER*",
    "*WEBHOOK*",
    "*CREDENTIAL",
    "*CREDENTIALS",
    "*CREDENTIAL_*",
    "AUTH*",
    "*_AUTH",
    "*_AUTH_*",
    "COOKIE*",
    "*_COOKIE",
    "AWS_*",
    "AZURE_*",
    "DATABASE_URL",
    "*_DATABASE_URL",
    "*_DB_URL",
    "POSTGRES*_URL",
    "MYSQL*_URL",
    "MONGO*_URI",
    "MONGO*_URL",
    "REDIS*_URL",
    "AMQP*_URL",
    "*_DSN",
    "NETRC",
    "REQUIEM_*",
    "SSH_AUTH_SOCK",
    "GPG_AGENT_INFO",
)

# Set by the engine itself; a request cannot override them.
RESERVED_NAMES = frozenset(
    {"TZ", "LC_ALL", "LANG", "PYTHONHASHSEED", "SOURCE_DATE_EPOCH", "HOME", "TMPDIR"}
    | {"PWD", "OLDPWD", "HOSTNAME"}
)
RESERVED_PREFIXES = ("LD_", "FAKETIME", "LC_")


def is_secret_name(name: str) -> bool:
    """True if ``name`` looks like it holds a credential."""
    upper = name.upper()
    return any(fnmatchcase(upper, pattern) for pattern in SECRET_PATTERNS)


def is_reserved_name(name: str) -> bool:
    upper = name.upper()
    return upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES)


def _matches(name: str, patterns: list[str]) -> bool:
    upper = name.upper()
    return any(fnmatchcase(upper, pattern.upper()) for pattern in patterns)


@dataclass
class EnvDecision:
    """The keys the request may pass to the child, and why the others were dropped."""

    env: dict[str, str]
    not_allowed: list[str] = field(default_factory=list)
    denied: list[str] = field(default_factory=list)
    secret: list[str] = field(default_factory=list)
    reserved: list[str] = field(default_factory=list)

    def applied(self) -> dict[str, list[str]]:
        """Key names only; values never leave this object."""
        return {
            "env_passed": sorted(self.env),
            "env_not_allowed": sorted(self.not_allowed),
            "env_denied": sorted(self.denied),
            "env_secret_stripped": sorted(self.secret),
            "env_reserved": sorted(self.reserved),
        }


def filter_env(request: ExecutionRequest) -> EnvDecision:
    """Apply allow, deny, secret and reserved rules to the request's env."""
    policy = request.policy
    decision = EnvDecision(env={})
    for name, value in sorted(request.env.items()):
        if policy.env_allow is not None and not _matches(name, policy.env_allow):
            decision.not_allowed.append(name)
        elif _matches(name, policy.env_deny):
            decision.denied.append(name)
        elif is_secret_name(name):
            decision.secret.append(name)
        elif is_reserved_name(name):
            decision.reserved.append(name)
        else:
            decision.env[name] = value
    return decision


def check_required(policy: Policy, decision: EnvDecision) -> None:
    """EnvRequiredMissing naming the first required key the child would not get."""
    for name in policy.env_required:
        if name in decision.env:
            continue
        if name in decision.secret:
            why = "it looks like a secret and secrets never reach the child"
        elif name in decision.denied or name in decision.not_allowed:
            why = "the policy's env_allow/env_deny removes it"
        elif name in decision.reserved:
            why = "the engine sets it itself"
        else:
            why = "the request's env does not set it"
        msg = f"required environment variable {name} is missing: {why}"
        raise EnvRequiredMissing(msg, name=name)


def check_strict(policy: Policy, gaps: list[str]) -> None:
    """In strict mode, refuse to run when anything asked for cannot be enforced."""
    if policy.mode == "strict" and gaps:
        msg = f"strict mode refuses to run without: {', '.join(gaps)}"
        raise SandboxUnavailable(msg, missing=gaps)
