"""The config keys for people: each key's default and one-line comment, and the resolved YAML.

The comments are read from the trailing comments of the fields in config/schema.py, the one place
they are written (nanoGPT style: every default has its comment beside it). Reading the
source keeps that single place; a field without a comment fails tests/test_config_docs.py.
No torch, no numpy: `toolkit train --help` and `toolkit config` start fast.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

import yaml

import toolkit.config.schema as schema


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the trailing comment of the field's last line in config/schema.py."""
    source = Path(schema.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef):
            for node in cls.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    found[(cls.name, node.target.id)] = comments.get(node.end_lineno, "")
    return found


def keys() -> list[tuple[str, typing.Any, str]]:
    """Every dotted key in definition order: (key, default value, comment)."""
    comments, out = _field_comments(), []

    def walk(obj, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append((prefix + f.name, value, comments.get((type(obj).__name__, f.name), "")))

    walk(schema.Config(), "")
    return out


def as_override(value) -> str:
    """A value as written after `key=` on the command line: lists comma-separated, "" for empty."""
    if isinstance(value, list):
        return ",".join(as_override(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def help_text() -> str:
    """The key table of `toolkit train --help`: KEY=DEFAULT and its comment, one key a line."""
    rows = [(f"{key}={as_override(value)}", comment) for key, value, comment in keys()]
    width = min(36, max(len(k) for k, _ in rows))
    lines = ["config keys, KEY=DEFAULT (override any with KEY=VALUE; a YAML file holds only what differs):"]
    section = ""
    for (text, comment), (key, _, _) in zip(rows, keys()):
        if key.partition(".")[0] != section and "." in key:  # a blank line before each section
            section = key.partition(".")[0]
            lines.append("")
        lines.append(f"  {text:<{width}}  {comment}".rstrip())
    return "\n".join(lines)


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line: `mean: [0.485, 0.456, 0.406]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def resolved_yaml(cfg: schema.Config, source: str = "") -> str:
    """`cfg` as YAML that load_config reads back to an equal Config, each key with its comment."""
    comments = {key: comment for key, _, comment in keys()}
    text = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, width=10_000)
    lines = [f"# resolved config{f' from {source}' if source else ''}; every key with its comment"]
    section = ""
    for line in text.splitlines():
        name = line.strip().split(":", 1)[0]
        if not line.startswith(" "):
            section = name
            key = name
        else:
            key = f"{section}.{name}"
        comment = comments.get(key)
        lines.append(f"{line}  # {comment}" if comment else line)
    commented = "\n".join(lines) + "\n"
    # a value that YAML spreads over several lines would take a comment in the wrong place: keep it plain then
    return commented if yaml.safe_load(commented) == cfg.to_dict() else lines[0] + "\n" + text
