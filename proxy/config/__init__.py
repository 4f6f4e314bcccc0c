"""Gateway configuration: the attrs schema and its layered, line-aware loader."""
from __future__ import annotations

from .load import (
    PROVIDER_TYPES,
    ConfigError,
    ConfigProblem,
    Origins,
    converter,
    environment_notes,
    load_config,
    load_config_with_origins,
    layer_files,
    load_layers,
    structure,
)
from .schema import (
    Config,
    LoggingConfig,
    PipelineEntry,
    ProviderConfig,
    ServerConfig,
    SimulationConfig,
    StreamingConfig,
)

__all__ = [
    "Config",
    "ServerConfig",
    "StreamingConfig",
    "LoggingConfig",
    "ProviderConfig",
    "SimulationConfig",
    "PipelineEntry",
    "load_config",
    "environment_notes",
    "load_config_with_origins",
    "load_layers",
    "layer_files",
    "structure",
    "ConfigError",
    "ConfigProblem",
    "Origins",
    "converter",
    "PROVIDER_TYPES",
]
