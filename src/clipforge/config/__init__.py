"""Typed stage configs: the one source of truth for flags, YAML and JSON Schema."""

from clipforge.config.base import StageConfig, load_config, validation_message

__all__ = ["StageConfig", "load_config", "validation_message"]
