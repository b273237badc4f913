"""The native engine's CUDA paths (issue 12 item 2, issue 7 item 7).

On CPU: the device setting's resolution and plumbing, the IPC handle types crossing a pickle, the
CUDA arena's layout, the MPS / green-context partition logic and the split follower, the decode
graphs' bucketing, and the padded static decode step itself (run eagerly, no graph) against the
normal path, token for token. With a GPU: the same engine on CUDA (graphs replayed, fp32 greedy equal
to the CPU engine), the IPC mapping across two processes, and Semi-PD on CUDA equal to colocated.
scripts/gpu_check.sh runs this file on the GPU machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import pytest
import torch

from edgeacc_ray.config import EngineConfig, SemiPDConfig
from edgeacc_ray.engine.hardware.device import (
    CudaRunnerOptions,
    DevicePlan,
    DeviceUnavailable,
    resolve_device,
)
from edgeacc_ray.engine.kv.cuda_ipc_storage import (
    CUDA_ALIGN,
    CudaArenaManifest,
    CudaIpcHandle,
    CudaIpcUnavailable,
    CudaStorageSpec,
)
from edgeacc_ray.engine.kv.shared_arena import ArenaManifest, TensorSlot, lay_out
from edgeacc_ray.engine.request import SamplingParams, Sequence
from edgeacc_ray.engine.runner import ModelRunner
from edgeacc_ray.engine.runner.cuda_graphs import DecodeGraphs, batch_buckets, bucket, page_buckets
from edgeacc_ray.engine.split.core_split import ControlBlock, CoreSplit
from edgeacc_ray.engine.split.sm_split import (
    MPS_PERCENTAGE_ENV,
    FixedShare,
    SmPartitions,
    SmSplitFollower,
    SmSplitMode,
    SmSplitReport,
    detect_mode,
    mps_running,
    set_mps_share,
)
from edgeacc_ray.llm import LLM
from edgeacc_ray.models.attention_flashinfer import paged_layout
from tests.test_engine_correctness import TEXT, assert_pool_idle

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (run by scripts/gpu_check.sh on the GPU machine)"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
FP32 = dict(dtype="float32", max_num_batched_tokens=128, decode_workspace_memory_gb=0)


def batch_prompts(tokenizer) -> list[list[int]]:
    """Prompt lengths that cross page buckets (1, 2, 4, 8, 16+ pages of 16) and batch buckets."""
    ids = tokenizer.encode(TEXT)
    return [ids[:3], ids[:17], ids[:40], ids[5:70], ids[:130], ids[20:21], ids[:260]]


# -- the device setting ------------------------------------------------------------------------------
def test_device_resolution():
    assert resolve_device("auto", cuda_present=False) == "cpu"
    assert resolve_device("auto", cuda_present=True) == "cuda"
    assert resolve_device("cpu", cuda_present=True) == "cpu"
    with pytest.raises(DeviceUnavailable):
        resolve_device("cuda", cuda_present=False)
    plan = DevicePlan.resolve("auto", cuda_present=True, flashinfer_present=False)
    assert plan == DevicePlan("cuda", "torch", True)
    # flashinfer plans on the host every step: its steps are not captured
    assert DevicePlan.resolve("cuda", cuda_present=True, flashinfer_present=True) == DevicePlan(
        "cuda", "flashinfer", False
    )
    assert DevicePlan.resolve("cuda", "torch", cuda_graphs=False, cuda_present=True) == DevicePlan(
        "cuda", "torch", False
    )
    assert DevicePlan.resolve(
        "auto", "auto", cuda_present=False, flashinfer_present=True
    ) == DevicePlan("cpu", "torch", False)
    with pytest.raises(DeviceUnavailable):
        DevicePlan.resolve("cpu", "flashinfer", cuda_present=True, flashinfer_present=True)
    with pytest.raises(DeviceUnavailable):
        DevicePlan.resolve("cuda", "flashinfer", cuda_present=True, flashinfer_present=False)


def test_device_setting_reaches_the_engine_and_the_serve_config():
    from edgeacc_ray.config import ServeConfig

    assert EngineConfig(device="auto").device == "auto"
    with pytest.raises(ValueError):
        EngineConfig(device="tpu")
    assert ServeConfig(device="auto", engine_num_gpus=1).engine_config().device == (
        "cuda" if CUDA else "cpu"
    )
    assert (
        ServeConfig(cuda_graphs=False, attention_backend="torch").engine_config().cuda_graphs
        is False
    )
    if not CUDA:
        with LLM("tiny", device="auto", **FP32) as llm:
            assert llm.engine.device == "cpu" and llm.engine.model_info["device"] == "cpu"
            assert llm.engine.runner.graphs is None and llm.engine.runner.flashinfer is None
        with pytest.raises(DeviceUnavailable):
            LLM("tiny", device="cuda")


# -- what crosses to the prefill process ------------------------------------------------------------
def _handle() -> CudaIpcHandle:
    return CudaIpcHandle(
        device=0,
        handle=bytes(range(64)),
        size_bytes=2**21,
        offset_bytes=512,
        ref_counter_handle=b"/torch_123_456",
        ref_counter_offset=3,
        event_handle=bytes(64),
        event_sync_required=True,
    )


def test_ipc_handle_and_storage_spec_cross_a_pickle_unchanged():
    slots, nbytes = lay_out(
        {"w": ((3, 5), torch.bfloat16), "kv_cache": ((2, 2, 4, 16, 8), torch.bfloat16)}, CUDA_ALIGN
    )
    manifest = CudaArenaManifest("edgeacc-cuda-1-abc", _handle(), nbytes, slots)
    control = ArenaManifest(
        "/dev/shm/edgeacc-arena-1-x", 64, {"control": TensorSlot(0, (8,), "int64")}
    )
    spec = CudaStorageSpec(manifest, control, "/models/small", "auto")
    data = pickle.dumps(spec)
    assert pickle.loads(data) == spec and spec.name == "edgeacc-cuda-1-abc"
    assert len(data) < 2048  # a handle, not the memory
    report = SmSplitReport("prefill", SmSplitMode.MPS_FIXED.value, "80", 50, {})
    assert pickle.loads(pickle.dumps(report)) == report


def test_cuda_arena_layout_is_aligned_and_disjoint():
    specs = {"a": ((7,), torch.float32), "b": ((3, 3), torch.bfloat16), "c": ((1000,), torch.int64)}
    slots, nbytes = lay_out(specs, CUDA_ALIGN)
    spans = sorted((s.offset, s.offset + s.nbytes) for s in slots.values())
    assert all(offset % CUDA_ALIGN == 0 for offset, _ in spans)
    assert (
        all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])) and spans[-1][1] <= nbytes
    )


def test_a_host_tensor_has_no_ipc_handle():
    with pytest.raises(CudaIpcUnavailable):
        CudaIpcHandle.export(torch.zeros(4).untyped_storage())


# -- the SM split ----------------------------------------------------------------------------------
def test_partition_choice_never_gives_less_than_asked():
    p = SmPartitions((30, 50, 70, 100))
    assert [p.choose(units) for units in range(11)] == [
        30,
        30,
        30,
        30,
        50,
        50,
        70,
        70,
        100,
        100,
        100,
    ]
    assert SmPartitions((100, 20, 20)).levels == (20, 100)
    assert (
        p.num_sms(50, 132) == 64 and p.num_sms(30, 132) == 32 and p.num_sms(1, 132) == 8
    )  # groups of 8
    with pytest.raises(ValueError):
        SmPartitions((0, 50))


def test_mode_follows_mps_and_green_contexts(tmp_path, monkeypatch):
    assert not mps_running(tmp_path)
    (tmp_path / "control").touch()
    assert mps_running(tmp_path)
    assert detect_mode(False, True) is SmSplitMode.TIME_SHARING
    assert detect_mode(True, False) is SmSplitMode.MPS_FIXED
    assert detect_mode(True, True) is SmSplitMode.GREEN_CONTEXTS
    monkeypatch.setattr(
        os, "environ", {k: v for k, v in os.environ.items() if k != MPS_PERCENTAGE_ENV}
    )
    if not torch.cuda.is_initialized():  # a CUDA process can no longer take a share
        set_mps_share(80)
        assert os.environ[MPS_PERCENTAGE_ENV] == "80"
    with pytest.raises(ValueError):
        set_mps_share(0)


def test_follower_applies_its_share_at_sync_and_only_when_it_moves():
    control = ControlBlock(torch.zeros(8, dtype=torch.int64))
    prefill = SmSplitFollower(control, "prefill", SmSplitMode.MPS_FIXED, FixedShare())
    shared = SmSplitFollower(control, "prefill", SmSplitMode.TIME_SHARING, FixedShare())
    control.publish(CoreSplit(tuple(range(3)), tuple(range(3, 10))))
    assert prefill.sync() == (0, 1, 2) and prefill.applier.level == 30
    control.publish(CoreSplit(tuple(range(8)), tuple(range(8, 10))))
    prefill.sync()
    assert prefill.applier.level == 100 and prefill.report().level == 100
    control.publish(CoreSplit((), tuple(range(10))))  # no prefill work: it keeps its last share
    assert prefill.sync() == tuple(range(8)) and prefill.applier.level == 100
    shared.sync()
    assert shared.applier.level is None  # time-sharing: nothing to apply
    with pytest.raises(ValueError):
        SmSplitFollower(control, "both", SmSplitMode.MPS_FIXED, FixedShare())


# -- decode graphs: buckets and the padded step -----------------------------------------------------
def test_buckets():
    assert batch_buckets(256)[-1] == 256 and batch_buckets(5) == (1, 2, 4, 5)
    assert page_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256) and page_buckets(100)[-1] == 100
    sizes = batch_buckets(300)
    assert (
        bucket(sizes, 1) == 1
        and bucket(sizes, 3) == 4
        and bucket(sizes, 257) == 300
        and bucket(sizes, 301) is None
    )


def test_padded_static_decode_step_matches_the_normal_path():
    """The forward a graph captures (padded rows on a scratch page, masks built from lengths), run
    eagerly on CPU, gives the same greedy tokens as the normal step, across batch and page buckets."""
    with LLM("tiny", **FP32) as reference:
        prompts = batch_prompts(reference.tokenizer)
        expected = reference.generate(prompts[:2], GREEDY) + reference.generate(prompts, GREEDY)
    with LLM("tiny", **FP32) as llm:
        engine = llm.engine
        old = engine.runner
        options = CudaRunnerOptions("torch", True, engine.config.max_num_seqs, engine.max_model_len)
        engine.runner = ModelRunner(
            old.model, old.args, engine.block_manager.num_pages, old.page_size, cuda=options
        )
        assert (
            engine.runner.kv_cache.shape[3] == engine.block_manager.num_pages + 1
        )  # the scratch page
        got = llm.generate(prompts[:2], GREEDY) + llm.generate(
            prompts, GREEDY
        )  # short rows alone, then all
        graphs = engine.runner.graphs
        assert (
            graphs.replays > 0
            and len({b for b, _ in graphs.buckets}) >= 2
            and len({p for _, p in graphs.buckets}) >= 2
        )
        assert_pool_idle(llm)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


def test_graphs_take_pure_decode_steps_only():
    with LLM("tiny", **FP32) as llm:
        runner = llm.engine.runner
        graphs = DecodeGraphs(
            runner.model,
            runner.kv_caches,
            runner.page_size,
            scratch_page=0,
            max_num_seqs=4,
            max_pages=8,
            capture=False,
        )
        seqs = []
        for i in range(5):
            seq = Sequence(f"r{i}", [1, 2, 3], GREEDY, arrival_time=0.0)
            seq.page_table, seq.num_computed_tokens = [i + 1], 2
            seqs.append(seq)
        from edgeacc_ray.engine.scheduling import ScheduledBatch

        assert graphs.accepts(ScheduledBatch([(s, 1) for s in seqs[:4]], 4, []))
        assert not graphs.accepts(
            ScheduledBatch([(s, 1) for s in seqs], 5, [])
        )  # past the largest bucket
        assert not graphs.accepts(
            ScheduledBatch([(seqs[0], 1), (seqs[1], 2)], 1, [])
        )  # a prompt row
        with pytest.raises(ValueError):
            DecodeGraphs(
                runner.model, runner.kv_caches, runner.page_size, 0, 4, 8, capture=True
            )  # CPU pool


def test_flashinfer_layout_of_a_mixed_batch():
    a, b = (
        Sequence("a", list(range(40)), GREEDY, arrival_time=0.0),
        Sequence("b", list(range(9)), GREEDY, arrival_time=0.0),
    )
    a.page_table, a.num_computed_tokens = (
        [7, 3, 9],
        39,
    )  # decode row: context 40 -> 3 pages, 8 in the last
    b.page_table, b.num_computed_tokens = [5], 0  # prompt row: 9 tokens in one page
    layout = paged_layout([(a, 1), (b, 9)], page_size=16)
    assert layout.qo_indptr.tolist() == [0, 1, 10] and layout.kv_indptr.tolist() == [0, 3, 4]
    assert layout.kv_indices.tolist() == [7, 3, 9, 5] and layout.last_page_len.tolist() == [8, 9]
    assert not layout.decode_only and paged_layout([(a, 1)], 16).decode_only


# -- on the GPU ------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_engine_fp32_greedy_equals_cpu_and_replays_graphs():
    with LLM("tiny", **FP32) as cpu:
        prompts = batch_prompts(cpu.tokenizer)
        expected = cpu.generate(prompts, GREEDY)
    with LLM("tiny", device="cuda", attention_backend="torch", **FP32) as gpu:
        assert gpu.engine.runner.kv_cache.is_cuda
        got = gpu.generate(prompts, GREEDY)
        assert gpu.engine.runner.graphs.replays > 0
        assert all(b.graph is not None for b in gpu.engine.runner.graphs.buckets.values())
        assert_pool_idle(gpu)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


@needs_cuda
def test_cuda_graphs_equal_eager_on_the_gpu():
    with LLM("tiny", device="cuda", cuda_graphs=False, attention_backend="torch", **FP32) as eager:
        prompts = batch_prompts(eager.tokenizer)
        expected = eager.generate(prompts, GREEDY)
    with LLM("tiny", device="cuda", cuda_graphs=True, attention_backend="torch", **FP32) as graphed:
        got = graphed.generate(prompts, GREEDY)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


def _child_writes(manifest: CudaArenaManifest, queue) -> None:
    from edgeacc_ray.engine.kv.cuda_ipc_storage import CudaArena

    arena = CudaArena.attach(manifest)
    seen = arena.tensors["x"].clone().cpu()
    arena.tensors["x"].fill_(7.0)
    torch.cuda.synchronize()
    queue.put((seen.tolist(), arena.buffer.data_ptr()))
    arena.close()


@needs_cuda
def test_ipc_arena_is_the_same_memory_in_two_processes():
    from edgeacc_ray.engine.kv.cuda_ipc_storage import CudaArena

    arena = CudaArena.create({"x": ((4,), torch.float32)}, "cuda")
    arena.tensors["x"].copy_(torch.arange(4.0))
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(arena.manifest, queue))
    child.start()
    seen, _child_ptr = queue.get(timeout=120)
    child.join(60)
    assert seen == [0.0, 1.0, 2.0, 3.0]  # the child read the owner's bytes
    assert arena.tensors["x"].cpu().tolist() == [7.0] * 4  # and the owner sees the child's writes
    arena.close()


@needs_cuda
def test_semi_pd_on_cuda_equals_colocated_and_shares_the_pool():
    with LLM("tiny", device="cuda", **FP32) as colocated:
        prompts = batch_prompts(colocated.tokenizer)
        expected = colocated.generate(prompts, GREEDY)
    with LLM("tiny", device="cuda", semi_pd=SemiPDConfig(prefill_batch_tokens=96), **FP32) as llm:
        got = llm.generate(prompts, GREEDY)
        engine = llm.engine
        assert engine.pd.spec.name.startswith("edgeacc-cuda-")
        assert (
            engine.runner.kv_cache.data_ptr()
            == engine.pd.storage.arena.tensors["kv_cache"].data_ptr()
        )
        report = llm.prefill_process.split_report()
        assert report is not None and report.role == "prefill"
        assert_pool_idle(llm)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
