from edgeacc_ray.config.serve import ConfigError, ServeConfig

__all__ = ["ConfigError", "ServeConfig"]
