"""From logits to the next token: penalties, biases and grammar masks (`logit_controls`), sampling
with per-request generators (`sampler`), and the prompt's logprobs (`prompt_logprobs`)."""

from edgeacc_ray.engine.sampling.sampler import sample

__all__ = ["sample"]
