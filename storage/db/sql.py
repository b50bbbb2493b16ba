"""SQL templates: ``sql/*.sql`` split on ``-- name:`` blocks, rendered per prefix.

Statements use the literal ``<prefix>`` for table and index names and ``$n`` for
values.  :func:`queries` renders every statement for one validated prefix and is
cached per prefix, so several apps with different prefixes share one process.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path
from types import MappingProxyType

from ..config import validate_prefix


def bundled(name: str) -> Path:
    """The directory ``name`` (``sql`` or ``migrations``) of this copy of the code.

    An installed wheel carries it inside the package as ``storage/_<name>`` (setup.py
    maps it there); a checkout, plain or installed editable, has it at the top level
    beside ``storage/``.
    """
    packaged = importlib.resources.files("storage") / f"_{name}"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / name


SQL_DIR = bundled("sql")
_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_TOKEN = "<prefix>"


def parse(text: str, source: str = "<sql>") -> dict[str, str]:
    """Split one file into ``{name: sql}``; the comment lines after a name are kept."""
    parts = _NAME_RE.split(text)
    blocks: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"{source}: duplicate statement name {name!r}")
        sql = body.strip()
        if not sql:
            raise ValueError(f"{source}: statement {name!r} is empty")
        blocks[name] = sql
    return blocks


@functools.cache
def templates() -> MappingProxyType[str, str]:
    """All statements of all files in ``sql/``, loaded once."""
    found: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        for name, sql in parse(path.read_text(encoding="utf-8"), path.name).items():
            if name in found:
                raise ValueError(f"{path.name}: statement {name!r} is defined twice")
            found[name] = sql
    return MappingProxyType(found)


def render(template: str, prefix: str) -> str:
    """Fill ``<prefix>`` into one template after validating the prefix."""
    sql = template.replace(_TOKEN, validate_prefix(prefix))
    if "<" in sql and re.search(r"<[a-z_]+>", sql):
        raise ValueError(f"unknown placeholder left in SQL: {sql[:80]!r}")
    return sql


class Queries:
    """Rendered statements for one prefix, as read-only attributes (``q.get_file``)."""

    __slots__ = ("prefix", "_sql")

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)
        self._sql = MappingProxyType({n: render(t, prefix) for n, t in templates().items()})

    def __getattr__(self, name: str) -> str:
        try:
            return self._sql[name]
        except KeyError:
            raise AttributeError(f"no SQL statement named {name!r}") from None

    def items(self):
        return self._sql.items()


@functools.cache
def queries(prefix: str) -> Queries:
    """The rendered statements for ``prefix`` (cached per prefix)."""
    return Queries(prefix)
