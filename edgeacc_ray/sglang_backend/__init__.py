"""The `sglang` backend: SGLang engines (their schedulers and TP workers) behind the engine interface the
Ingress already uses. Everything here but `engine.py` is pure and imports no SGLang, so the mapping from
our settings and requests to SGLang's, and from SGLang's output back to ours, is testable on CPU.

- `edgeacc_ray.config.sglang`: the nested `sglang:` settings of `ServeConfig` and what the backend refuses.
- `server_args`: ServeConfig -> `sglang.Engine(**kwargs)` for one role (colocated, prefill, decode).
- `requests`: our SamplingParams -> SGLang's `sampling_params` dict and logprob arguments.
- `outputs`: SGLang's `async_generate` stream items -> our `RequestOutput` chunks or typed errors.
- `engine`: `SGLangEngine`, the adapter the engine-side deployments hold (imports SGLang lazily).
"""
