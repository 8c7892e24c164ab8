"""Typed experiment configuration: YAML file + ``key=value`` overrides -> nested dataclasses.

schema.py holds every key, type, default and help text; loading.py reads YAML and overrides into
it (unknown keys and ill-typed values rejected, naming the closest valid key); checks.py checks
the values. `from toolkit.config import Config, load_config, ...` is the public face of all three.
"""

from toolkit.config.checks import CHOICES, BOUNDS, validate
from toolkit.config.loading import apply_overrides, load_config, parse_overrides, parse_yaml, save_config
from toolkit.config.schema import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, valid_keys

__all__ = ["BOUNDS", "CHOICES", "Config", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "apply_overrides", "load_config", "parse_overrides", "parse_yaml", "save_config", "valid_keys", "validate"]
