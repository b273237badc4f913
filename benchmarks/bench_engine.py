"""Offline engine throughput: N prompts x IN tokens in, OUT tokens out, greedy, ignore_eos.

    python -m benchmarks.bench_engine                       # small model, bf16, 32 x 200 -> 128
    python -m benchmarks.bench_engine --vllm-python /tmp/peers/vllm/bin/python   # vLLM side by side

Prints output tok/s, total tok/s and MFU against the bf16 matmul peak measured in the same run.
With --vllm-python, vLLM's offline LLM runs the same token ids in a subprocess (prefix caching off),
interleaved with ours, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

VLLM_SCRIPT = r"""
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    cfg = json.load(open(sys.argv[1]))
    llm = LLM(cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"], enable_prefix_caching=False,
              seed=0)
    sp = SamplingParams(max_tokens=cfg["output_len"], temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in cfg["prompts"]]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    for _ in range(cfg["repeat"]):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        print("VLLM_RESULT", json.dumps({"seconds": dt, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}), flush=True)
"""


def random_prompts(
    vocab_size: int, special_ids: set[int], num: int, length: int, seed: int
) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in special_ids]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(num)]


def matmul_peak_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best bf16 GEMM rate of this process's threads on shapes like the model's (tokens x 512 x 1408)."""
    best = 0.0
    for m, k, n in [(256, 512, 2816), (512, 512, 2816), (1024, 1024, 1024)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.nn.functional.linear(a, b)
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.nn.functional.linear(a, b)
            iters += 1
        best = max(best, 2 * m * k * n * iters / (time.perf_counter() - start) / 1e9)
    return best


def model_flops(args, num_prompts: int, input_len: int, output_len: int) -> float:
    """Matmul FLOPs of the run: projections for every token, attention over the context, lm_head per sampled token."""
    d, h, kv, hd, inter = (
        args.hidden_size,
        args.num_heads,
        args.num_kv_heads,
        args.head_dim,
        args.intermediate_size,
    )
    per_token = 2 * args.num_layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * inter)
    tokens = num_prompts * (input_len + output_len - 1)
    ctx_sum = num_prompts * sum(
        range(1, input_len + output_len)
    )  # sum of context lengths over all tokens
    attention = 4 * args.num_layers * h * hd * ctx_sum
    lm_head = 2 * d * args.vocab_size * num_prompts * output_len
    return per_token * tokens + attention + lm_head


def run_vllm(python: str, model_path: str, prompts: list[list[int]], args) -> list[dict]:
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="4",
        VLLM_CACHE_ROOT="/tmp/peers/vllm-cache",
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, script = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "run_vllm.py")
        json.dump(
            dict(
                model=model_path,
                dtype=args.dtype,
                max_model_len=1024,
                output_len=args.output_len,
                prompts=prompts,
                repeat=args.repeat,
            ),
            open(cfg_path, "w"),
        )
        open(script, "w").write(VLLM_SCRIPT)
        proc = subprocess.run(
            [python, script, cfg_path], env=env, capture_output=True, text=True, cwd=tmp
        )
    results = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("VLLM_RESULT")
    ]
    if not results:
        raise RuntimeError(f"vLLM run failed:\n{proc.stderr[-3000:]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--num-threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument(
        "--vllm-python", help="python of a vllm-cpu venv: run vLLM offline side by side"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edgeacc_ray.engine.request import SamplingParams
    from edgeacc_ray.llm import LLM

    llm = LLM(
        args.model,
        dtype=args.dtype,
        num_threads=args.num_threads,
        enable_prefix_caching=False,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=max(256, args.num_prompts),
    )
    engine = llm.engine
    prompts = random_prompts(
        engine.args.vocab_size,
        set(llm.tokenizer.all_special_ids),
        args.num_prompts,
        args.input_len,
        args.seed,
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(
        prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )  # warm-up
    peak = matmul_peak_gflops(engine.dtype)
    flops = model_flops(engine.args, args.num_prompts, args.input_len, args.output_len)
    ours: list[float] = []
    vllm: list[float] = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        ours.append(time.perf_counter() - start)
        assert sum(len(o.token_ids) for o in outs) == args.num_prompts * args.output_len
    if args.vllm_python:
        vllm = [
            r["seconds"] for r in run_vllm(args.vllm_python, str(engine.model_path), prompts, args)
        ]
        for _ in range(args.repeat):  # ours again after vLLM, so both see the same machine state
            start = time.perf_counter()
            llm.generate(prompts, params)
            ours.append(time.perf_counter() - start)
    out_tokens = args.num_prompts * args.output_len
    total_tokens = args.num_prompts * (args.input_len + args.output_len)
    print(
        f"model={args.model} dtype={args.dtype} threads={args.num_threads} prompts={args.num_prompts} "
        f"in={args.input_len} out={args.output_len} matmul_peak={peak:.0f} GFLOP/s"
    )
    print("| engine | best s | output tok/s | total tok/s | MFU |")
    print("|---|---|---|---|---|")
    rows = [("edgeacc-ray native", min(ours))] + (
        [("vLLM (vllm-cpu) offline", min(vllm))] if vllm else []
    )
    for name, seconds in rows:
        print(
            f"| {name} | {seconds:.2f} | {out_tokens / seconds:,.0f} | {total_tokens / seconds:,.0f} | "
            f"{flops / seconds / 1e9 / peak:.1%} |"
        )
    print(
        f"all runs (s): ours={[round(s, 2) for s in ours]}"
        + (f" vllm={[round(s, 2) for s in vllm]}" if vllm else "")
    )
    if vllm:
        print(f"ratio ours/vLLM output tok/s: {min(vllm) / min(ours):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
