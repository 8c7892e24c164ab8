"""Reading a config: YAML file + ``key=value`` overrides -> the checked Config.

Unknown keys and ill-typed values are rejected with one sentence naming the key (and the closest
valid key for typos); YAML is read without aliases and never executes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from toolkit import UserError
from toolkit.config.checks import validate
from toolkit.config.schema import Config, valid_keys
from toolkit.core.meta import short


class SafeNoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load's loader without aliases (*name): a few hundred bytes of nested aliases expand to
    gigabytes (a "billion laughs"), and no config needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """YAML text -> Python values, as yaml.safe_load but refusing aliases."""
    try:
        return yaml.load(text, Loader=SafeNoAliasLoader)
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise yaml.YAMLError(str(e).splitlines()[0][:100]) from None


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # a typo in the section part still deserves a suggestion
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run `toolkit train --help` for the keys"
    return UserError(f"unknown config key {short(key)}{hint}")


def _coerce(key: str, value, t):
    """Check `value` against the annotated type `t`; convert only where lossless and obvious."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        t = next(a for a in args if a is not type(None))
        origin = typing.get_origin(t)
    if origin is list:
        (item_t,) = typing.get_args(t)
        if isinstance(value, str):  # `data.mean=0.5,0.5,0.5` on the command line
            value = [parse_yaml(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {short(value)}")
        if len(value) > 16:
            raise UserError(f"config key '{key}' must be a short list, got {len(value)} values")
        return [_coerce(f"{key}[{i}]", v, item_t) for i, v in enumerate(value)]
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e300 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"config key '{key}' must be a finite number, got {short(value)}")
            return number
    elif t is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            if "\0" in str(value) or len(str(value)) > 4096:
                raise UserError(f"config key '{key}' must be a text of at most 4096 characters without NUL, "
                                f"got {short(value)}")
            return str(value)
    raise UserError(f"config key '{key}' must be {t.__name__}, got {short(value)}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            while isinstance(value, dict) and value:  # report the full key of a misspelt section
                sub, value = next(iter(value.items()))
                key += f".{sub}"
            raise _unknown_key(key)
        t = hints[name]
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise UserError(f"config section '{key}' must be a mapping of keys, got {short(value)}")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, t))



def parse_overrides(pairs: list[str]) -> dict:
    """['optim.lr=0.1', 'train.epochs=3'] -> {'optim': {'lr': 0.1}, 'train': {'epochs': 3}}."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' must look like key=value, e.g. train.epochs=5")
        key, raw = pair.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise UserError(f"override {short(pair)} is not valid YAML: {str(e).splitlines()[0][:100]}") from None
        *sections, leaf = key.strip().split(".")
        node = nested
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise _unknown_key(key)
        node[leaf] = value
    return nested


def apply_overrides(cfg: Config, nested: dict) -> Config:
    """Apply nested updates (as from parse_overrides) to `cfg` and validate the result."""
    _apply(cfg, nested)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- key=value overrides, checked and validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {_yaml_reason(e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{path}' cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of keys")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(list(overrides)))
    validate(cfg)
    return cfg


def _yaml_reason(e: Exception) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return (problem or str(e).splitlines()[0])[:100] + where


def save_config(cfg: Config, path: str | Path) -> None:
    from toolkit.core.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
