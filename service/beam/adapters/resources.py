"""Where the Lua scripts and SQL migrations are, in a checkout or an installed wheel.

In a checkout (editable install) they are the top-level ``lua/`` and ``migrations/``
directories; a wheel carries copies under ``beam/_data/`` (pyproject force-include).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@cache
def resource_dir(name: str) -> Path:
    candidates = (_PACKAGE_ROOT / "_data" / name, _PACKAGE_ROOT.parent.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ not found in {', '.join(map(str, candidates))}")


def lua_dir() -> Path:
    return resource_dir("lua")


def migrations_dir() -> Path:
    return resource_dir("migrations")
