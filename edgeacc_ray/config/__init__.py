from edgeacc_ray.config.engine import EngineConfig, SemiPDConfig
from edgeacc_ray.config.serve import ConfigError, ServeConfig

__all__ = ["ConfigError", "EngineConfig", "SemiPDConfig", "ServeConfig"]
