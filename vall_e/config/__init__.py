"""Typed configuration: the YAML sections as dataclasses (`schema`), loaded with `key.sub=value`
overrides on every command (`loading`); `python -m vall_e.config` prints the resolved result.

    cfg, args = parse_config(argv, parser)   # pulls `yaml=...` and `key=value` out of argv
"""
from vall_e.config.loading import help_text, load_config, load_yaml, parse_config, split_overrides
from vall_e.config.schema import (BitsAndBytesConfig, CodecConfig, Config, DatasetConfig, DeepSpeedConfig,
                                  EvaluationConfig, HyperparametersConfig, InferenceConfig, ModelConfig, TrainerConfig)

__all__ = [
    "BitsAndBytesConfig", "CodecConfig", "Config", "DatasetConfig", "DeepSpeedConfig", "EvaluationConfig",
    "HyperparametersConfig", "InferenceConfig", "ModelConfig", "TrainerConfig",
    "help_text", "load_config", "load_yaml", "parse_config", "split_overrides",
]
