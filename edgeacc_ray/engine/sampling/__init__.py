from edgeacc_ray.engine.sampling.sampler import sample

__all__ = ["sample"]
