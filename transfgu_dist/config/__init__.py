"""The typed configuration: one dataclass per section (`schema`), the dataset presets and the `paper` profile
(`presets`), and the loader that applies preset < profile < YAML file < command-line overrides (`loading`).
`Config()` is the `reference` profile; the image sizes left None are derived by `derive_sizes`."""

from transfgu_dist.config.loading import dump_yaml, load_config, load_yaml, set_key, to_dict
from transfgu_dist.config.presets import PRESETS, PROFILES
from transfgu_dist.config.schema import (
    ARCHS,
    DERIVED_SIZES,
    ClusterConfig,
    Config,
    ConfigError,
    CropConfig,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    EvalConfig,
    LossConfig,
    PseudoLabelConfig,
    ResourcesConfig,
    TrainConfig,
    derive_sizes,
    worker_range,
)

__all__ = [
    "ARCHS",
    "DERIVED_SIZES",
    "PRESETS",
    "PROFILES",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "CropConfig",
    "DataConfig",
    "DecoderConfig",
    "EncoderConfig",
    "EvalConfig",
    "LossConfig",
    "PseudoLabelConfig",
    "ResourcesConfig",
    "TrainConfig",
    "derive_sizes",
    "dump_yaml",
    "load_config",
    "load_yaml",
    "set_key",
    "to_dict",
    "worker_range",
]
