"""The import path `toolkit.meta` of scripts written before the package layout: the Meta record is
in toolkit/core/meta.py."""

from toolkit.core.meta import META_KEY, SCHEMA_VERSION, Meta, read_meta  # noqa: F401
