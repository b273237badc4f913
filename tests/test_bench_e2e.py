"""Both benchmark commands end to end against the real EdgeAcc application (Ray Serve, tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_multiturn, bench_overload, bench_serving


def test_sweep_against_the_served_app(
    serve_app_url: str, tiny_model_path: str, tmp_path: Path
) -> None:
    records = bench_serving.main(
        [
            "--base-url",
            serve_app_url,
            "--name",
            "edgeacc",
            "--model",
            "tiny",
            "--tokenizer",
            tiny_model_path,
            "--dataset",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            "8",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "2,4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert [r["max_concurrency"] for r in records] == [2, 4]
    for r in records:
        assert (r["completed"], r["failed"]) == (8, 0), r["errors"]
        assert (
            r["total_output_tokens"] == 8 * 8
        )  # ignore_eos: exactly the requested length, from usage
        assert r["total_input_tokens"] == 8 * 32  # the random prompts tokenize to exactly 32 tokens
        assert 0 < r["mean_ttft_ms"] < r["mean_e2e_ms"] and r["mean_tpot_ms"] > 0
    assert "| Concurrency | edgeacc |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "output_throughput.png").exists()


def test_multiturn_against_the_served_app(
    serve_app_url: str, tiny_model_path: str, tmp_path: Path
) -> None:
    [r] = bench_multiturn.main(
        [
            "--base-url",
            serve_app_url,
            "--name",
            "edgeacc",
            "--model",
            "tiny",
            "--tokenizer",
            tiny_model_path,
            "--num-conversations",
            "2",
            "--num-rounds",
            "3",
            "--max-concurrency",
            "2",
            "--first-len",
            "64",
            "--turn-len",
            "16",
            "--output-len",
            "8",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert (r["completed"], r["failed"], r["skipped"]) == (6, 0, 0), r["errors"]
    # Later rounds resend whole pages of history, so both measurements see hits, and they agree.
    assert 0 < r["hit_rate_metrics"] <= r["hit_rate_ideal"]
    assert r["hit_rate_usage"] == pytest.approx(r["hit_rate_metrics"], abs=0.02)
    assert (tmp_path / "multiturn_e2e.png").exists()


def test_overload_run_against_the_served_app(serve_app_url: str) -> None:
    [row] = bench_overload.main(
        [
            "--targets",
            f"edgeacc={serve_app_url}",
            "--model",
            "tiny",
            "--clients",
            "6",
            "--max-tokens",
            "4",
            "--time-limit",
            "60",
        ]
    )
    assert row["mix"] == {"complete": 6} and row["goodput_tok_s"] > 0
    assert (
        row["pages_in_use_after"] == 0 and row["peak_rss_mb"] > 0
    )  # the app's replica processes were found
    with pytest.raises(SystemExit):  # loopback only
        bench_overload.main(["--targets", "x=http://10.0.0.1:8000", "--clients", "1"])
