"""The child's environment, built from nothing.

Nothing of the caller's environment is inherited. The child gets the keys the
policy let through (see :mod:`requiem.engine.policy`) and then the engine's own,
which no request can override: ``TZ=UTC``, ``LC_ALL``/``LANG=C.UTF-8``,
``PYTHONHASHSEED=0``, ``SOURCE_DATE_EPOCH``, ``HOME`` (the workspace), ``TMPDIR``,
``PWD``, and in fixed-time mode ``FAKETIME`` (``LD_PRELOAD`` is added by whoever
launches, so that it never applies to the sandbox tool itself). ``PATH``, ``USER``
and ``LOGNAME`` have fixed defaults that a request's env may replace.
"""

from __future__ import annotations

from requiem.engine.sandbox import FIXED_PATH, faketime_spec

DEFAULTS = {"PATH": FIXED_PATH, "USER": "requiem", "LOGNAME": "requiem"}


def build_env(
    passed: dict[str, str],
    *,
    home: str,
    tmpdir: str,
    cwd: str,
    epoch: int,
    frozen_clock: bool,
) -> dict[str, str]:
    """The complete environment of the child (without ``LD_PRELOAD``)."""
    env = {**DEFAULTS, **passed}
    env.update(
        {
            "HOME": home,
            "TMPDIR": tmpdir,
            "PWD": cwd,
            "TZ": "UTC",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "SOURCE_DATE_EPOCH": str(epoch),
        }
    )
    if frozen_clock:
        env["FAKETIME"] = faketime_spec(epoch)
    return env
