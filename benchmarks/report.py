"""Turning figures into the printed table and the JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

#: The system the ratios are about, and the ones it is compared with.
SUBJECT = "taskq"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int = 0

    @property
    def title(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"

    def format(self, value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.{self.digits}f}"


ROUND_METRICS = [
    Metric("rt_p50_ms", "round trip p50 (ms)", False, 2),
    Metric("rt_p99_ms", "round trip p99 (ms)", False, 2),
    Metric("throughput_per_s", "end-to-end throughput (tasks/s)", True),
    Metric("cpu_us_client", "  CPU per task: client (µs)", False),
    Metric("cpu_us_worker", "  CPU per task: worker tree (µs)", False),
    Metric("cpu_us_broker", "  CPU per task: broker (µs)", False),
    Metric("enqueue_per_s", "confirmed enqueue (tasks/s)", True),
    Metric("bulk_per_s", "bulk enqueue (tasks/s)", True),
    Metric("startup_s", "worker start-up to 1st result (s)", False, 2),
    Metric("idle_rss_mb", "worker RSS idle (MiB)", False, 1),
]
#: Not a figure of the system: how much CPU other work took meanwhile (see noise.py).
NOISE = Metric("others_cores", "others' CPU use (cores)", False, 2)
#: Above this, a round's figures are suspect and the report says so.
NOISY_CORES = 0.15
MEMORY_METRICS = [
    Metric("idle_rss_mb", "worker RSS idle (MiB)", False, 1),
    Metric("after_rss_mb", "worker RSS after N tasks (MiB)", False, 1),
    Metric("idle_pss_mb", "worker PSS idle (MiB)", False, 1),
    Metric("after_pss_mb", "worker PSS after N tasks (MiB)", False, 1),
]


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_round(rounds: list[dict[str, Any]], key: str, system: str) -> list[float | None]:
    return [row.get(key) for row in rounds if row["system"] == system]


def summarize(
    rounds: list[dict[str, Any]], memory: dict[str, dict[str, Any]], systems: list[str]
) -> dict[str, dict[str, float | None]]:
    """{metric: {system: value}}: medians over rounds, and the memory phase's figures."""
    summary: dict[str, dict[str, float | None]] = {}
    for metric in ROUND_METRICS:
        summary[metric.key] = {s: median(per_round(rounds, metric.key, s)) for s in systems}
    for metric in MEMORY_METRICS[1:]:
        summary[metric.key] = {s: memory.get(s, {}).get(metric.key) for s in systems}
    return summary


def ratios(summary: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """{metric: {"taskq/floor": x, "taskq/celery": y}} from the summary."""
    out: dict[str, dict[str, float | None]] = {}
    for key, by_system in summary.items():
        mine = by_system.get(SUBJECT)
        out[key] = {}
        for other, value in by_system.items():
            if other == SUBJECT:
                continue
            ok = mine is not None and value
            out[key][f"{SUBJECT}/{other}"] = mine / value if ok else None  # type: ignore[operator]
    return out


# -- text ----------------------------------------------------------------------------------------


def _row(cells: list[str], widths: list[int]) -> str:
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(
        f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
    )


def rounds_table(rounds: list[dict[str, Any]], systems: list[str], n_rounds: int) -> list[str]:
    widths = [38, 8] + [11] * n_rounds + [11]
    head = ["per round", "system", *[f"r{i + 1}" for i in range(n_rounds)], "median"]
    lines = [_row(head, widths)]
    for metric in [*ROUND_METRICS, NOISE]:
        for i, system in enumerate(systems):
            values = per_round(rounds, metric.key, system)
            cells = [metric.title if i == 0 else "", system]
            cells += [metric.format(v) for v in values] + [metric.format(median(values))]
            lines.append(_row(cells, widths))
    return lines


def memory_table(memory: dict[str, dict[str, Any]], systems: list[str], tasks: int) -> list[str]:
    widths = [38, *[11] * len(systems)]
    lines = [_row([f"memory ({tasks:,} tasks, one worker)", *systems], widths)]
    for metric in MEMORY_METRICS:
        label = metric.title.replace("N tasks", f"{tasks:,}")
        cells = [metric.format(memory.get(s, {}).get(metric.key)) for s in systems]
        lines.append(_row([label, *cells], widths))
    procs = [str(memory.get(s, {}).get("processes", "?")) for s in systems]
    lines.append(_row(["processes in the worker tree", *procs], widths))
    noise = [NOISE.format(memory.get(s, {}).get(NOISE.key)) for s in systems]
    lines.append(_row([NOISE.title, *noise], widths))
    return lines


def noise_warning(rounds: list[dict[str, Any]], memory: dict[str, dict[str, Any]]) -> list[str]:
    phases = [(f"round {r['round']} {r['system']}", r) for r in rounds]
    phases += [(f"memory {name}", m) for name, m in memory.items()]
    noisy = [
        f"{name} ({figures[NOISE.key]:.2f})"
        for name, figures in phases
        if figures.get(NOISE.key, 0) > NOISY_CORES
    ]
    lines = []
    if noisy:
        lines.append(f"WARNING: other processes took CPU (cores) during: {', '.join(noisy)}")
    else:
        lines.append(f"machine was quiet: other processes used < {NOISY_CORES} cores throughout")
    repeated = [name for name, figures in phases if figures.get("broker_restarts")]
    if repeated:
        lines.append(f"RabbitMQ restarted under (so these were run again): {', '.join(repeated)}")
    return lines


def summary_table(
    summary: dict[str, dict[str, float | None]], systems: list[str], tasks: int
) -> list[str]:
    others = [s for s in systems if s != SUBJECT]
    ratio_heads = [f"{SUBJECT}/{o}" for o in others] if SUBJECT in systems else []
    widths = [38, *[11] * len(systems), *[14] * len(ratio_heads)]
    lines = [_row(["summary (medians)", *systems, *ratio_heads], widths)]
    table_ratios = ratios(summary)
    for metric in ROUND_METRICS + MEMORY_METRICS[1:2]:
        label = metric.title.replace("N tasks", f"{tasks:,}")
        cells = [metric.format(summary[metric.key].get(s)) for s in systems]
        for head in ratio_heads:
            value = table_ratios[metric.key].get(head)
            cells.append("n/a" if value is None else f"{value:.2f}x")
        lines.append(_row([label, *cells], widths))
    return lines


def interleaved_table(result: dict[str, Any], systems: list[str]) -> list[str]:
    interleaved = result.get("interleaved")
    if not interleaved:
        return []
    sizes = result["meta"]["sizes"]
    others = [s for s in systems if s != SUBJECT]
    ratio_heads = [f"{SUBJECT}/{o}" for o in others] if SUBJECT in systems else []
    widths = [38, *[11] * len(systems), *[14] * len(ratio_heads)]
    lines = [_row(["interleaved (same stretch of time)", *systems, *ratio_heads], widths)]
    metrics = [
        Metric("rt_p50_ms", "round trip p50 (ms)", False, 2),
        Metric("rt_p99_ms", "round trip p99 (ms)", False, 2),
        Metric("enqueue_per_s", "confirmed enqueue (tasks/s)", True),
    ]
    table_ratios = result.get("interleaved_ratios", {})
    for metric in metrics:
        cells = [metric.format(interleaved[metric.key].get(s)) for s in systems]
        for head in ratio_heads:
            value = table_ratios.get(metric.key, {}).get(head)
            cells.append("n/a" if value is None else f"{value:.2f}x")
        lines.append(_row([metric.title, *cells], widths))
    lines.append(
        f"({sizes['interleaved_round_trips']:,} round trips and {sizes['interleaved_enqueue']:,} "
        "enqueues per system, in alternating blocks of 20 and 100; "
        f"others' CPU use {interleaved.get('others_cores', 0):.2f} cores)"
    )
    return lines


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    systems = meta["systems"]
    tasks = meta["sizes"]["memory_tasks"]
    sections = [
        [
            f"taskq benchmarks: {meta['sizes']['rounds']} round(s), {meta['slots']} worker "
            f"slots per system, RabbitMQ {meta['rabbitmq']}, {meta['cpus']} CPUs, "
            f"taskq {meta['versions']['taskq']} ({meta['git']}), celery "
            f"{meta['versions']['celery']}",
            "↓ lower is better, ↑ higher is better; ratios are taskq's value / the other's",
        ],
        rounds_table(result["rounds"], systems, meta["sizes"]["rounds"]),
        memory_table(result["memory"], systems, tasks),
        summary_table(result["summary"], systems, tasks),
        interleaved_table(result, systems),
        [
            "bulk enqueue measures: "
            + "; ".join(f"{s}: {meta['bulk_methods'][s]}" for s in systems),
            *noise_warning(result["rounds"], result["memory"]),
            f"run took {meta['duration_s']:.0f}s",
        ],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)
