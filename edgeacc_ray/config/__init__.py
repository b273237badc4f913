"""Every setting, in one place: `ServeConfig` (what `serve_config.yaml` and the environment set),
`EngineConfig` (one native engine) and the tunables both inherit (`EngineSettings`, `SemiPDSettings`),
so no setting is copied and each cross-field refusal is written once."""

from edgeacc_ray.config.engine import EngineConfig, SemiPDConfig
from edgeacc_ray.config.serve import ConfigError, ServeConfig

__all__ = ["ConfigError", "EngineConfig", "SemiPDConfig", "ServeConfig"]
