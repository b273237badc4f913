"""One prepared GPU check of the native engine's CUDA paths (issue 12 item 4, issue 7 item 7).

No Ray, no network, no SGLang: it drives the engine directly. Each step runs in its own Python process
under its own timeout (a hung kernel or a crashed CUDA context costs that step, not the run), all
steps share one deadline (8 minutes by default), and the table is printed with whatever finished:

  env         torch / CUDA / GPU / MPS / green contexts / flashinfer, as this machine has them
  build       the built-in Qwen3 checkpoints, made locally (`tiny` for tests, `small` for figures)
  pytest      tests/test_cuda_paths.py (the CUDA tests run; on CPU they skip)
  hf          greedy native engine vs HF transformers on the device: fp32 token-identical, bf16 agreement
  semi_pd     the two-process Semi-PD path: IPC mapping (same memory in both processes), the handoff
              carries no KV bytes, the SM split each process applies, greedy equal to colocated
  throughput  decode and prefill tok/s, native colocated vs native semi_pd

`--cpu-dry-run` runs the same steps on CPU with the `tiny` model and small loads, to check the script.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEADLINE_S = 470  # under 8 minutes, with room to print
STEP_TIMEOUTS = dict(env=60, build=180, pytest=240, hf=150, semi_pd=150, throughput=200)


@dataclass
class Row:
    """One line of the final table."""

    step: str
    check: str
    result: str
    ok: bool | None = None  # None: a figure, not a pass/fail check


@dataclass(frozen=True)
class Setup:
    device: str
    model: str  # the figures' model
    test_model: str
    prompts: int
    new_tokens: int
    prompt_len: int


def setup(cpu: bool) -> Setup:
    if cpu:
        return Setup("cpu", "tiny", "tiny", prompts=4, new_tokens=8, prompt_len=48)
    return Setup("cuda", "small", "tiny", prompts=64, new_tokens=128, prompt_len=256)


# -- steps (each runs in its own process) ------------------------------------------------------------
def step_env(s: Setup) -> list[Row]:
    import torch

    from edgeacc_ray.engine.hardware import flashinfer_available
    from edgeacc_ray.engine.split import green_contexts_supported, mps_pipe_directory, mps_running

    rows = [Row("env", "torch", torch.__version__), Row("env", "device", s.device)]
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rows += [
            Row(
                "env",
                "gpu",
                f"{props.name}, {props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}",
            )
        ]
    rows += [
        Row(
            "env",
            "MPS daemon",
            f"{'running' if mps_running() else 'not running'} ({mps_pipe_directory()})",
        ),
        Row("env", "green contexts in torch", str(green_contexts_supported())),
        Row(
            "env",
            "flashinfer",
            "imports" if flashinfer_available() else "absent: torch attention path",
        ),
        Row("env", "SGLang comparison", "skipped: no SGLang on this machine (and no Ray)"),
    ]
    return rows


def step_build(s: Setup) -> list[Row]:
    from edgeacc_ray.models.builtin_models import resolve_model

    rows = []
    for name in dict.fromkeys([s.test_model, s.model]):
        start = time.perf_counter()
        path = resolve_model(name)
        rows.append(
            Row("build", f"model {name}", f"{path} ({time.perf_counter() - start:.1f} s)", True)
        )
    return rows


def step_pytest(s: Setup) -> list[Row]:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return [
            Row(
                "pytest",
                "tests/test_cuda_paths.py",
                "not run: pytest is not installed here (the hf and "
                "semi_pd steps still exercise the CUDA paths)",
                False,
            )
        ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(ROOT / "tests" / "test_cuda_paths.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    summary = next(
        (
            line
            for line in reversed(lines)
            if " in " in line and ("passed" in line or "failed" in line)
        ),
        lines[-1] if lines else "no output",
    )
    failed = [line for line in lines if line.startswith("FAILED")]
    rows = [Row("pytest", "tests/test_cuda_paths.py", summary.strip("= "), out.returncode == 0)]
    rows += [Row("pytest", "failed", line[len("FAILED ") :][:150], False) for line in failed[:6]]
    if out.returncode != 0 and not failed:
        rows.append(Row("pytest", "output tail", " | ".join(lines[-4:])[:300], False))
    return rows


def _prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Deterministic prompts of about `length` tokens, each a different slice of a stdlib source file
    (no test imports: the GPU machine may lack pytest)."""
    text = Path(json.__file__).read_text()[: 40 * (length + 100)]
    ids = tokenizer.encode(text)
    return [ids[(7 * i) % 97 : (7 * i) % 97 + length - (i % 5)] for i in range(count)]


def _hf_greedy(
    path: str, prompts: list[list[int]], new_tokens: int, dtype, device: str
) -> list[list[int]]:
    """HF transformers' own forward, greedy with its KV cache, one prompt at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model(input_ids=ids, use_cache=True)
            tokens = []
            for _ in range(new_tokens):
                token = int(out.logits[0, -1].float().argmax())
                tokens.append(token)
                out = model(
                    input_ids=torch.tensor([[token]], device=device),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
            outputs.append(tokens)
    del model
    return outputs


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """(sequences identical, % of tokens before the first divergence)."""
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = 0
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n
    return same, 100.0 * prefix / max(1, sum(len(b) for b in theirs))


def step_hf(s: Setup) -> list[Row]:
    import torch

    from edgeacc_ray.engine.request import SamplingParams
    from edgeacc_ray.llm import LLM
    from edgeacc_ray.models.builtin_models import resolve_model

    path = str(resolve_model(s.model))
    count, new = min(s.prompts, 8), min(s.new_tokens, 32)
    rows = []
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        with LLM(s.model, device=s.device, dtype=dtype_name, max_num_batched_tokens=2048) as llm:
            prompts = _prompts(llm.tokenizer, count, min(s.prompt_len, 128))
            ours = [
                o.token_ids
                for o in llm.generate(
                    prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
                )
            ]
        theirs = _hf_greedy(path, prompts, new, dtype, s.device)
        same, pct = _agreement(ours, theirs)
        exact = dtype_name == "float32"
        rows.append(
            Row(
                "hf",
                f"greedy vs HF, {dtype_name}, {count} x {new} tokens",
                f"{same}/{count} identical, {pct:.1f}% tokens agree",
                (same == count) if exact else None,
            )
        )
    return rows


def step_semi_pd(s: Setup) -> list[Row]:
    from edgeacc_ray.config import SemiPDConfig
    from edgeacc_ray.engine.request import SamplingParams
    from edgeacc_ray.engine.runner import kv_page_bytes
    from edgeacc_ray.engine.semi_pd import PrefillBatch, PrefillTask, page_sums
    from edgeacc_ray.llm import LLM

    params = SamplingParams(temperature=0, max_tokens=min(s.new_tokens, 24), ignore_eos=True)
    engine_args = dict(device=s.device, dtype="float32", max_num_batched_tokens=512)
    with LLM(s.model, **engine_args) as colocated:
        prompts = _prompts(colocated.tokenizer, min(s.prompts, 8), s.prompt_len)
        expected = [o.token_ids for o in colocated.generate(prompts, params)]
    rows = []
    with LLM(s.model, semi_pd=SemiPDConfig(prefill_batch_tokens=256), **engine_args) as llm:
        engine = llm.engine
        got = [o.token_ids for o in llm.generate(prompts, params)]
        rows.append(
            Row(
                "semi_pd",
                "greedy fp32 equal to colocated",
                f"{sum(a == b for a, b in zip(got, expected))}/{len(prompts)} sequences",
                got == expected,
            )
        )
        # A prompt's pages, written only by the prefill process, read by both.
        engine.add_request(
            "probe", prompts[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        )
        engine.step()
        seq = engine.sequences["probe"]
        pages = list(seq.page_table)
        engine.pd.dispatcher.wait()
        engine.step()
        kv = engine.runner.kv_cache
        own = page_sums(kv, pages)
        child = llm.prefill_process.probe(pages)
        while engine.has_unfinished():
            engine.step()
        same_bytes = child.page_sums == own and all(v > 0 for v in own)
        rows.append(
            Row(
                "semi_pd",
                "prefill-written KV seen by decode",
                f"{len(pages)} pages, sums equal: {child.page_sums == own}",
                same_bytes,
            )
        )
        rows.append(
            Row(
                "semi_pd",
                "pool address decode / prefill",
                f"{kv.data_ptr():#x} / {child.kv_cache_ptr:#x} "
                f"({'same pointer' if kv.data_ptr() == child.kv_cache_ptr else 'different mapping address, same memory'})",
            )
        )
        arena_bytes = engine.pd.storage.arena.manifest.nbytes
        if s.device == "cuda":
            rows.append(
                Row(
                    "semi_pd",
                    "prefill process's own CUDA allocations",
                    f"{child.own_allocated_bytes / 2**20:.1f} "
                    f"MiB vs {arena_bytes / 2**20:.1f} MiB weights+pool mapped",
                    child.own_allocated_bytes < arena_bytes / 2,
                )
            )
        task = PrefillTask("r", prompts[0], len(prompts[0]), 0, pages, params)
        handoff = len(pickle.dumps(PrefillBatch(engine.pd.spec, [task])))
        kv_bytes = len(prompts[0]) * kv_page_bytes(engine.args, 1, engine.dtype)
        rows.append(
            Row(
                "semi_pd",
                "handoff bytes vs the prompt's KV",
                f"{handoff} B vs {kv_bytes} B",
                handoff < kv_bytes / 10,
            )
        )
        report = llm.prefill_process.split_report()
        decode_follower = engine.pd._follower
        if report is not None:
            rows.append(
                Row(
                    "semi_pd",
                    "SM split (prefill process)",
                    f"mode {report.mode}, MPS share "
                    f"{report.mps_percentage}, level {report.level}%, green SMs {report.sm_counts or '-'}",
                )
            )
            rows.append(
                Row(
                    "semi_pd",
                    "SM split (decode process)",
                    f"mode {decode_follower.mode.value}, level "
                    f"{decode_follower.applier.level}, split moves {engine.pd.split.moves_total}",
                )
            )
        else:
            rows.append(
                Row(
                    "semi_pd",
                    "core split",
                    f"{engine.stats().split.prefill_cores} / "
                    f"{engine.stats().split.decode_cores}, moves {engine.pd.split.moves_total}",
                )
            )
    return rows


def _timed(llm, prompts, params) -> tuple[float, int, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return (
        time.perf_counter() - start,
        sum(len(p) for p in prompts),
        sum(len(o.token_ids) for o in outs),
    )


def step_throughput(s: Setup) -> list[Row]:
    from edgeacc_ray.config import SemiPDConfig
    from edgeacc_ray.engine.request import SamplingParams
    from edgeacc_ray.llm import LLM

    rows = []
    for mode in ("colocated", "semi_pd"):
        extra = (
            dict(semi_pd=SemiPDConfig(prefill_batch_tokens=4096, max_prefill_batches_in_flight=2))
            if mode == "semi_pd"
            else {}
        )
        with LLM(
            s.model,
            device=s.device,
            dtype="bfloat16",
            max_num_batched_tokens=8192,
            max_num_seqs=max(s.prompts, 8),
            **extra,
        ) as llm:
            long = _prompts(llm.tokenizer, s.prompts, s.prompt_len)
            short = [p[:16] for p in long]
            decode = SamplingParams(temperature=0, max_tokens=s.new_tokens, ignore_eos=True)
            llm.generate(
                short[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            )  # warm up
            llm.generate(short, decode)  # capture the batch's graph buckets outside the timing
            llm.engine.flush_cache()
            seconds, _, out_tokens = _timed(llm, short, decode)
            decode_rate = out_tokens / seconds
            llm.engine.flush_cache()
            seconds, in_tokens, _ = _timed(
                llm, long, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
            )
            prefill_rate = in_tokens / seconds
            llm.engine.flush_cache()
            seconds, _, out_tokens = _timed(llm, long, decode)
            rows.append(
                Row(
                    "throughput",
                    f"{mode}: decode / prefill / mixed tok/s",
                    f"{decode_rate:,.0f} / {prefill_rate:,.0f} / {out_tokens / seconds:,.0f} "
                    f"({s.prompts} x {s.prompt_len} in, {s.new_tokens} out, bf16)",
                )
            )
            graphs = llm.engine.runner.graphs
            if graphs is not None:
                captured = sum(b.graph is not None for b in graphs.buckets.values())
                rows.append(
                    Row(
                        "throughput",
                        f"{mode}: decode CUDA graphs",
                        f"{captured} captured, {graphs.replays} "
                        f"replays, {graphs.eager_fallbacks} eager steps"
                        + (f"; FAILED: {graphs.failure}" if graphs.failure else ""),
                        graphs.failure is None,
                    )
                )
            elif s.device == "cuda":
                rows.append(
                    Row(
                        "throughput",
                        f"{mode}: decode CUDA graphs",
                        f"off (attention: {llm.engine.plan.attention})",
                    )
                )
    return rows


STEPS: dict[str, Callable[[Setup], list[Row]]] = dict(
    env=step_env,
    build=step_build,
    pytest=step_pytest,
    hf=step_hf,
    semi_pd=step_semi_pd,
    throughput=step_throughput,
)


# -- the driver ----------------------------------------------------------------------------------------
def run_step(name: str, cpu: bool, timeout: float) -> tuple[list[Row], float]:
    """Run one step in a child process under `timeout`; a failure becomes a row, never an exception."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out)]
        cmd += ["--cpu-dry-run"] if cpu else []
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [
                Row(name, "step", f"timed out after {timeout:.0f} s", False)
            ], time.perf_counter() - start
        seconds = time.perf_counter() - start
        if out.exists():
            rows = [Row(**r) for r in json.loads(out.read_text())]
        else:
            rows = []
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:400]
            rows.append(Row(name, "step", f"exit {proc.returncode}: {tail}", False))
        return rows, seconds


def table(rows: list[Row], times: dict[str, float]) -> str:
    mark = {True: "ok", False: "FAIL", None: ""}
    lines = ["| step | check | result | status |", "|---|---|---|---|"]
    lines += [f"| {r.step} | {r.check} | {r.result} | {mark[r.ok]} |" for r in rows]
    lines.append(
        "| time | per step | " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + " | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="the same steps on CPU with the tiny model"
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS)
    )
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE_S, help="seconds for all steps together"
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = setup(args.cpu_dry_run)
    if args.step:  # inside a step's own process
        rows = STEPS[args.step](s)
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows]))
        return 0
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU visible to torch: run with --cpu-dry-run to check the script on CPU")
            return 2
    started = time.perf_counter()
    rows: list[Row] = []
    times: dict[str, float] = {}
    for name in [n for n in args.steps.split(",") if n]:
        left = args.deadline - (time.perf_counter() - started)
        if left < 10:
            rows.append(Row(name, "step", "skipped: the run's deadline was reached", False))
            continue
        step_rows, times[name] = run_step(name, args.cpu_dry_run, min(STEP_TIMEOUTS[name], left))
        rows += step_rows
        print(f"[{time.perf_counter() - started:5.0f} s] {name}: {len(step_rows)} rows", flush=True)
    print()
    print(
        f"EdgeAcc-Ray GPU check ({'CPU dry run, tiny model' if args.cpu_dry_run else 'CUDA'}; "
        f"{time.perf_counter() - started:.0f} s)"
    )
    print(table(rows, times))
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
