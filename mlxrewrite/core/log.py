"""Logs: the decisions, declines, traces and fallbacks of both paths, under the stdlib logger `mlxrewrite`.

In the manner of TORCH_LOGS, `MLXREWRITE_LOGS=decisions,declines,traces,fallbacks` (or `all`) prints those
channels to stderr at import; `configure("decisions")` does the same from code. Each channel is a child
logger (`mlxrewrite.decisions`, ...), so an application can also route them with logging's own config.
Nothing here runs per call: verdicts are logged when a call kind is analysed, not when a decision is reused.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rule import Verdict

CHANNELS = ("decisions", "declines", "traces", "fallbacks")
LOGGER = logging.getLogger("mlxrewrite")


def channel(name: str) -> logging.Logger:
    return LOGGER.getChild(name)


def configure(spec: str | None = None) -> list[str]:
    """Turn on the channels named in `spec` (comma separated; "all"); returns them. Unknown names: ValueError."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if "all" in names:
        names = list(CHANNELS)
    unknown = sorted(set(names) - set(CHANNELS))
    if unknown:
        raise ValueError(f"MLXREWRITE_LOGS names unknown channels {unknown}; known: {', '.join(CHANNELS)}, all")
    for name in names:
        logger = channel(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(f"mlxrewrite.{name}: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
    return names


def verdict(found: "Verdict", path: str) -> None:
    """One rule's verdict at one site, on the decisions or declines channel."""
    from .rule import Decision

    if isinstance(found, Decision):
        channel("decisions").info("[%s] %s at %s -> %s: %s", path, found.rule, found.where, found.rewrite, found.reason)
    else:
        channel("declines").info("[%s] %s at %s declined: %s", path, found.rule, found.where, found.reason)


def _from_environment() -> None:
    try:
        configure(os.environ.get("MLXREWRITE_LOGS"))
    except ValueError as error:  # a bad variable must not break `import mlxrewrite`: say so once
        print(f"mlxrewrite: {error}", file=sys.stderr)


_from_environment()
