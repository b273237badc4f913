"""Results on disk: JSONL records, Markdown tables, PNG plots.

Sweep tables are laid out like the seed's: one table per metric, rows = concurrency, columns =
systems, then each system's ratio to the baseline. `python -m benchmarks.report FILE.jsonl ...
--out DIR [--baseline NAME]` rebuilds tables and plots from records of separate runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Record = dict[str, Any]

# (record key, table title); latency keys end in _ms.
SWEEP_METRICS: tuple[tuple[str, str], ...] = (
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_throughput", "Total token throughput (tok/s)"),
    ("request_throughput", "Request throughput (req/s)"),
    ("mean_ttft_ms", "Mean TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("mean_tpot_ms", "Mean TPOT (ms)"),
    ("p99_tpot_ms", "P99 TPOT (ms)"),
    ("mean_itl_ms", "Mean ITL (ms)"),
    ("p99_itl_ms", "P99 ITL (ms)"),
    ("mean_e2e_ms", "Mean E2E latency (ms)"),
    ("p99_e2e_ms", "P99 E2E latency (ms)"),
    ("failed", "Failed requests"),
    ("busy_cores_before", "Cores busy just before the run (other load; ~0 = quiet)"),
    ("busy_cores_after", "Cores busy just after the run (other load; ~0 = quiet)"),
)
# One plot per family: (file stem, y label, keys drawn).
SWEEP_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("output_throughput", "output tokens/s", ("output_throughput",)),
    ("total_throughput", "total tokens/s", ("total_throughput",)),
    ("request_throughput", "requests/s", ("request_throughput",)),
    ("ttft", "TTFT (ms)", ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms")),
    ("tpot", "TPOT (ms)", ("mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")),
    ("itl", "ITL (ms)", ("mean_itl_ms", "median_itl_ms", "p99_itl_ms")),
    ("e2e", "E2E latency (ms)", ("mean_e2e_ms", "median_e2e_ms", "p99_e2e_ms")),
)
MULTITURN_METRICS: tuple[tuple[str, str], ...] = (
    ("request_throughput", "Request throughput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_throughput", "Total token throughput (tok/s)"),
    ("mean_ttft_ms", "Mean TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("mean_tpot_ms", "Mean TPOT (ms)"),
    ("p99_tpot_ms", "P99 TPOT (ms)"),
    ("mean_itl_ms", "Mean ITL (ms)"),
    ("mean_e2e_ms", "Mean E2E latency (ms)"),
    ("p99_e2e_ms", "P99 E2E latency (ms)"),
    ("hit_rate_metrics", "KV hit rate (%), /metrics counters"),
    ("hit_rate_usage", "KV hit rate (%), usage.cached_tokens"),
    ("hit_rate_ideal", "KV hit rate (%), ideal: whole history reused"),
    ("mean_prompt_tokens", "Mean prompt tokens per request"),
    ("failed", "Failed requests"),
    ("skipped", "Rounds skipped after a failure"),
    ("busy_cores_before", "Cores busy just before the run (other load; ~0 = quiet)"),
    ("busy_cores_after", "Cores busy just after the run (other load; ~0 = quiet)"),
)
_STYLES = {"mean": "-", "median": ":", "p99": "--"}


def append_jsonl(path: Path, record: Record) -> None:
    """Append one record as a JSON line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(paths: Iterable[Path]) -> list[Record]:
    """All records of the given JSONL files, in order."""
    records: list[Record] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def fmt(value: Any) -> str:
    """A table cell: ints as is, floats to 1 decimal (3 for values < 10), '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def ratio(value: Any, base: Any) -> str:
    """`value / base` as '1.23x', '-' when undefined."""
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def systems_of(records: Sequence[Record], baseline: str | None) -> list[str]:
    """System names in first-seen order, the baseline first."""
    names = list(dict.fromkeys(r["system"] for r in records))
    if baseline is not None:
        if baseline not in names:
            raise ValueError(f"baseline {baseline!r} is not among the systems {names}")
        names.remove(baseline)
        names.insert(0, baseline)
    return names


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _comparison(
    title: str, row_label: str, rows: Sequence[tuple[str, Any]], systems: Sequence[str], cell: Any
) -> str:
    """One titled table: a row per (label, key), a column per system, then ratios to systems[0]."""
    header = [row_label, *systems, *(f"{s} / {systems[0]}" for s in systems[1:])]
    lines = []
    for label, key in rows:
        values = [cell(key, s) for s in systems]
        lines.append([label, *map(fmt, values), *(ratio(v, values[0]) for v in values[1:])])
    return f"### {title}\n\n" + _table(header, lines)


def concurrency_label(c: int | None) -> str:
    """Row label of a concurrency level (None = unlimited)."""
    return "inf" if c is None else str(c)


def _by_level(records: Sequence[Record]) -> dict[tuple[str, str], Record]:
    """Latest record per (system, concurrency label)."""
    return {(r["system"], concurrency_label(r["max_concurrency"])): r for r in records}


def _level_order(records: Sequence[Record]) -> list[str]:
    levels = {concurrency_label(r["max_concurrency"]) for r in records}
    return sorted(levels, key=lambda c: math.inf if c == "inf" else int(c))


def sweep_markdown(records: Sequence[Record], baseline: str | None = None) -> str:
    """Seed-style tables (rows = concurrency, columns = systems, ratios to the baseline)."""
    systems = systems_of(records, baseline)
    runs = _by_level(records)
    levels = _level_order(records)
    sections = [
        _comparison(
            title,
            "Concurrency",
            [(c, c) for c in levels],
            systems,
            lambda c, s, key=key: runs.get((s, c), {}).get(key),
        )
        for key, title in SWEEP_METRICS
    ]
    return "\n\n".join(sections) + "\n"


def _save(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, path: Path) -> Path:
    """Label, grid and legend the axes, write the figure to `path` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(records: Sequence[Record], out_dir: Path, baseline: str | None = None) -> list[Path]:
    """One PNG per metric family against concurrency, a line per system (and statistic)."""
    systems = systems_of(records, baseline)
    runs = _by_level(records)
    levels = [c for c in _level_order(records) if c != "inf"]
    paths = []
    for stem, ylabel, keys in SWEEP_PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, system in enumerate(systems):
            for key in keys:
                xs = [int(c) for c in levels if runs.get((system, c), {}).get(key) is not None]
                ys = [runs[(system, str(x))][key] for x in xs]
                stat = key.split("_")[0]
                label = f"{system} {stat}" if len(keys) > 1 else system
                ax.plot(xs, ys, _STYLES.get(stat, "-"), marker="o", color=f"C{i}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(c) for c in levels], labels=levels)
        paths.append(_save(fig, ax, "max concurrency", ylabel, out_dir / f"{stem}.png"))
    return paths


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def multiturn_markdown(records: Sequence[Record], baseline: str | None = None) -> str:
    """Summary table (rows = metric) and per-round E2E/TTFT tables (rows = round), systems as columns."""
    systems = systems_of(records, baseline)
    latest = {r["system"]: r for r in records}

    def summary_cell(key: str, system: str) -> Any:
        value = latest[system].get(key)
        return _percent(value) if key.startswith("hit_rate") else value

    summary = _comparison(
        "Multi-turn summary",
        "Metric",
        [(t, k) for k, t in MULTITURN_METRICS],
        systems,
        summary_cell,
    )
    rounds = [
        (str(n), n) for n in sorted({row["round"] for r in records for row in r["per_round"]})
    ]

    def per_round(key: str) -> Any:
        return lambda rnd, s: next(
            (row[key] for row in latest[s]["per_round"] if row["round"] == rnd), None
        )

    return (
        "\n\n".join(
            [
                summary,
                _comparison(
                    "Mean E2E latency per round (ms)",
                    "Round",
                    rounds,
                    systems,
                    per_round("mean_e2e_ms"),
                ),
                _comparison(
                    "Mean TTFT per round (ms)", "Round", rounds, systems, per_round("mean_ttft_ms")
                ),
            ]
        )
        + "\n"
    )


def plot_multiturn(
    records: Sequence[Record], out_dir: Path, baseline: str | None = None
) -> list[Path]:
    """Per-round mean E2E and TTFT, a line per system."""
    systems = systems_of(records, baseline)
    latest = {r["system"]: r for r in records}
    paths = []
    for stem, key, ylabel in (
        ("e2e", "mean_e2e_ms", "mean E2E latency (ms)"),
        ("ttft", "mean_ttft_ms", "mean TTFT (ms)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, system in enumerate(systems):
            rows = [row for row in latest[system]["per_round"] if row[key] is not None]
            ax.plot(
                [row["round"] for row in rows],
                [row[key] for row in rows],
                marker="o",
                color=f"C{i}",
                label=system,
            )
        paths.append(_save(fig, ax, "round", ylabel, out_dir / f"multiturn_{stem}.png"))
    return paths


def write_report(
    records: Sequence[Record], out_dir: Path, baseline: str | None, header: str = ""
) -> Path:
    """Write report.md and the plots for `records` (sweep and/or multi-turn) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = [r for r in records if r["bench"] == "serving"]
    multi = [r for r in records if r["bench"] == "multiturn"]
    parts = [header] if header else []
    if sweep:
        parts.append(sweep_markdown(sweep, baseline))
        plot_sweep(sweep, out_dir, baseline)
    if multi:
        parts.append(multiturn_markdown(multi, baseline))
        plot_multiturn(multi, out_dir, baseline)
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Rebuild report.md and plots from JSONL records of one or more runs."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("jsonl", nargs="+", type=Path, help="results.jsonl files")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--baseline", help="system the ratios are against (default: first seen)")
    args = parser.parse_args(argv)
    path = write_report(read_jsonl(args.jsonl), args.out, args.baseline)
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
