"""MkDocs hook: the configuration reference, generated from the typed run config at build time.

``docs/configuration.md`` holds the marker ``<!-- config-reference -->``; this hook replaces
it with one table per section of ``fedsynth.runs.config.RunConfig``: every key in the dotted,
dashed form users type (``train.local-steps``), its type and allowed range, its default and
the ``Field(description=...)`` the model gives it. Nothing is written by hand, so the page
cannot drift from the code. ``tests/test_docs.py`` imports :func:`config_rows` to check that
every key has a description.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"


@dataclass(frozen=True)
class Row:
    """One configuration key as the reference shows it."""

    section: str
    key: str
    type: str
    default: str
    description: str


def _type_name(annotation: Any, metadata: list[Any]) -> str:
    """``int, >= 1``, ``one of `a`, `b```, ``bool``: the type and range a user may give."""
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    name = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for item in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join([name, *bounds])


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else "(empty)"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def config_sections() -> list[tuple[str, str]]:
    """(section key, the section's docstring) in the order of ``RunConfig``."""
    from fedsynth.runs.config import RunConfig

    out = []
    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        assert isinstance(section, type)
        out.append((field.alias or name, " ".join((section.__doc__ or "").split())))
    return out


def config_rows() -> list[Row]:
    """Every key of ``RunConfig``, section by section, in the model's order."""
    from pydantic import BaseModel

    from fedsynth.runs.config import RunConfig

    rows = []
    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel)
        prefix = field.alias or name
        for key_name, key in section.model_fields.items():
            rows.append(
                Row(
                    section=prefix,
                    key=f"{prefix}.{key.alias or key_name}",
                    type=_type_name(key.annotation, list(key.metadata)),
                    default=_default(key.get_default(call_default_factory=True)),
                    description=" ".join((key.description or "").split()),
                )
            )
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The reference as Markdown: one table per section."""
    rows = config_rows()
    parts = []
    for section, doc in config_sections():
        parts.append(f"## `{section}`\n")
        if doc:
            parts.append(f"{doc}\n")
        parts.append("| key | type | default | description |")
        parts.append("| --- | --- | --- | --- |")
        for row in rows:
            if row.section == section:
                description = _cell(row.description) or "**(no description)**"
                parts.append(f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {description} |")
        if section == "model":
            parts.append(f"\n{_families()}")
        parts.append("")
    return "\n".join(parts)


def _families() -> str:
    """The values ``model.name`` accepts, from the family registry."""
    from fedsynth.models.registry import FAMILIES, presets

    names = ", ".join(f"`{name}`" for name in FAMILIES)
    preset_names = ", ".join(f"`{name}`" for name in presets())
    line = f"`model.name` accepts the registered families {names}"
    return line + (f" and the presets {preset_names}." if preset_names else ".")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: fill the marker on the configuration page."""
    if page.file.src_uri == PAGE:
        if MARKER not in markdown:
            raise ValueError(f"{PAGE}: the marker {MARKER} is missing")
        return markdown.replace(MARKER, render())
    return markdown
