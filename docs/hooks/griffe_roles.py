"""Griffe extension for the API reference: Sphinx roles in qmpc's docstrings as Markdown code.

qmpc's docstrings cross-reference with Sphinx roles (``:class:`~qmpc.errors.ConfigError```),
which Markdown would print verbatim. Each role becomes a code span of its target (the last
component when the target starts with ``~``, as Sphinx shows it). The package is not changed:
this runs on griffe's copy of the docstrings when mkdocstrings loads them.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _replace(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rst_roles_to_code(text: str) -> str:
    """``:class:`~a.B``` -> ```B```, ``:func:`a.f``` -> ```a.f```."""
    return _ROLE.sub(_replace, text)


class RstRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rst_roles_to_code(obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
