"""The native engine (PyTorch, CPU and CUDA). `LLMEngine` runs one step at a time (schedule -> run ->
sample -> postprocess) over the parts `builder` makes; `AsyncLLMEngine` runs it on a thread of its
own for servers. The parts live in sub-packages, each importing only those below it:

    request     what a request is: sampling params, grammar, validation, errors, Sequence, outputs
    hardware    where it computes: device and attention backend; CPU threads, pinning, priority
    kv          pages: block manager and prefix cache, shared storage, the KV offload tier
    split       Semi-PD's compute split (cores or SMs) and the controller that moves it
    scheduling  continuous batching, admission, the running bound, the queue's bounds
    sampling    logits -> tokens: logit controls, sampler, prompt logprobs
    runner      a batch -> one forward (CPU decode workspace, CUDA graphs)
    semi_pd     the prefill process and the decode side's dispatcher
    tp          tensor-parallel ranks

Importing this package stays light (the router and the Ingress import engine packages without the
model code); the engines themselves load on first use.
"""

__all__ = ["AsyncLLMEngine", "LLMEngine"]


def __getattr__(name: str):
    if name == "LLMEngine":
        from edgeacc_ray.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from edgeacc_ray.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(name)
