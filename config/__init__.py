"""Settings for alflow: load and validate `alflow.toml` plus `ALFLOW_*` overrides."""

from alflow.config.settings import (
    CONFIG_FILENAME,
    SKIP,
    STRATEGIES,
    ConfigError,
    EvaluationSettings,
    FilesSource,
    ModelSettings,
    QuerySettings,
    ReviewSettings,
    RunnerSettings,
    Settings,
    StoppingSettings,
    find_config,
    import_object,
    load_config,
)

__all__ = [
    "CONFIG_FILENAME",
    "SKIP",
    "STRATEGIES",
    "ConfigError",
    "EvaluationSettings",
    "FilesSource",
    "ModelSettings",
    "QuerySettings",
    "ReviewSettings",
    "RunnerSettings",
    "Settings",
    "StoppingSettings",
    "find_config",
    "import_object",
    "load_config",
]
