"""Turning figures into the printed table and the JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

#: The ratios the report prints: (first, second) is first's value / second's, when both ran.
RATIO_PAIRS = [
    ("taskq-embedded", "taskq"),
    ("taskq-embedded", "floor"),
    ("taskq-embedded", "huey"),
    ("taskq-embedded-full", "taskq-embedded"),
    ("taskq-embedded-events", "taskq-embedded"),
    ("taskq-events", "taskq"),
    ("taskq", "floor"),
    ("taskq", "celery"),
]
#: Short names for the ratio columns' heads.
SHORT = {"taskq-embedded": "emb", "taskq-embedded-full": "emb-full",
         "taskq-embedded-events": "emb-E", "taskq-events": "taskq-E"}
#: Workers with events on (``-E``), beside the same system without: the goal is a cost of at
#: most EVENTS_COST end to end.
EVENTS_PAIRS = [("taskq-embedded-events", "taskq-embedded"), ("taskq-events", "taskq")]
EVENTS_COST = 0.15
#: The system the project's targets are about.
EMBEDDED = "taskq-embedded"


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
    Metric("cpu_us_total", "  CPU per task: total (µs)", False),
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


def ratio_name(first: str, second: str) -> str:
    return f"{first}/{second}"


def ratio_head(name: str) -> str:
    first, second = name.split("/")
    return f"{SHORT.get(first, first)}/{SHORT.get(second, second)}"


def ratios(summary: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """{metric: {"taskq-embedded/taskq": x, ...}} for the RATIO_PAIRS of systems that ran."""
    out: dict[str, dict[str, float | None]] = {}
    for key, by_system in summary.items():
        out[key] = {}
        for first, second in RATIO_PAIRS:
            if first not in by_system or second not in by_system:
                continue
            mine, other = by_system[first], by_system[second]
            ok = mine is not None and other
            out[key][ratio_name(first, second)] = mine / other if ok else None  # type: ignore[operator]
    return out


# -- text ----------------------------------------------------------------------------------------


def _row(cells: list[str], widths: list[int]) -> str:
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(
        f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
    )


def widths_for(systems: list[str], first: int = 38) -> list[int]:
    """A column per system, as wide as its name needs (at least 11)."""
    return [first, *[max(11, len(s) + 2) for s in systems]]


def rounds_table(rounds: list[dict[str, Any]], systems: list[str], n_rounds: int) -> list[str]:
    widths = [38, max(len(s) for s in systems) + 2] + [11] * n_rounds + [11]
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
    widths = widths_for(systems)
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


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def values_table(
    title: str, metrics: list[Metric], table: dict[str, dict[str, float | None]],
    systems: list[str], tasks: int,
) -> list[str]:
    widths = widths_for(systems)
    lines = [_row([title, *systems], widths)]
    for metric in metrics:
        label = metric.title.replace("N tasks", f"{tasks:,}")
        cells = [metric.format(table.get(metric.key, {}).get(s)) for s in systems]
        lines.append(_row([label, *cells], widths))
    return lines


def ratios_table(
    title: str, metrics: list[Metric], table_ratios: dict[str, dict[str, float | None]],
    tasks: int,
) -> list[str]:
    names = list(dict.fromkeys(n for by_pair in table_ratios.values() for n in by_pair))
    if not names:
        return []
    heads = [ratio_head(n) for n in names]
    widths = [38, *[max(12, len(h) + 2) for h in heads]]
    lines = [_row([title, *heads], widths)]
    for metric in metrics:
        label = metric.title.replace("N tasks", f"{tasks:,}")
        cells = [_ratio_cell(table_ratios.get(metric.key, {}).get(n)) for n in names]
        lines.append(_row([label, *cells], widths))
    return lines


SUMMARY_METRICS = ROUND_METRICS + MEMORY_METRICS[1:2]
INTERLEAVED_METRICS = [
    Metric("rt_p50_ms", "round trip p50 (ms)", False, 2),
    Metric("rt_p99_ms", "round trip p99 (ms)", False, 2),
    Metric("enqueue_per_s", "confirmed enqueue (tasks/s)", True),
]


def interleaved_tables(result: dict[str, Any], systems: list[str]) -> list[str]:
    interleaved = result.get("interleaved")
    if not interleaved:
        return []
    sizes = result["meta"]["sizes"]
    lines = values_table("interleaved (same stretch of time)", INTERLEAVED_METRICS, interleaved,
                         systems, 0)  # fmt: skip
    lines += ["", *ratios_table("interleaved ratios", INTERLEAVED_METRICS,
                                result.get("interleaved_ratios", {}), 0)]  # fmt: skip
    lines.append(
        f"({sizes['interleaved_round_trips']:,} round trips and {sizes['interleaved_enqueue']:,} "
        "enqueues per system, in alternating blocks of 20 and 100; "
        f"others' CPU use {interleaved.get('others_cores', 0):.2f} cores)"
    )
    return lines


# -- the project's targets for taskq-embedded ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    #: The figure looked at, and whether the target holds (None: not measured in this run).
    value: str
    met: bool | None


def _number(value: float | None, digits: int = 0, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def ahead_of(
    summary: dict[str, dict[str, float | None]], other: str, tasks: int
) -> tuple[list[str], list[str]]:
    """(figures taskq-embedded is ahead of ``other`` on, figures it is not), over the summary.
    A tie is not ahead (CPU per task comes in clock ticks: equal values are common)."""
    ahead, behind = [], []
    for metric in SUMMARY_METRICS:
        mine, theirs = (summary.get(metric.key, {}).get(s) for s in (EMBEDDED, other))
        if mine is None or theirs is None:
            continue
        better = mine > theirs if metric.higher_is_better else mine < theirs
        label = metric.label.strip().replace("N tasks", f"{tasks:,} tasks")
        (ahead if better else behind).append(label)
    return ahead, behind


def targets(result: dict[str, Any]) -> list[Target]:
    """The project's targets for taskq-embedded, judged on the medians of this run."""
    summary, table_ratios = result["summary"], result["ratios"]
    if EMBEDDED not in result["meta"]["systems"]:
        return events_targets(result)
    p50 = summary["rt_p50_ms"].get(EMBEDDED)
    vs_taskq = table_ratios["rt_p50_ms"].get(ratio_name(EMBEDDED, "taskq"))
    e2e = summary["throughput_per_s"].get(EMBEDDED)
    bulk = summary["bulk_per_s"].get(EMBEDDED)
    found = [
        Target("round trip p50 <= 0.5 ms", _number(p50, 2, " ms"), _at_most(p50, 0.5)),
        Target("round trip p50 <= 0.5x taskq on RabbitMQ's", _ratio_cell(vs_taskq),
               _at_most(vs_taskq, 0.5)),
        Target("end-to-end >= 3,000 tasks/s", _number(e2e, unit="/s"), _at_least(e2e, 3000)),
        Target("bulk >= 30,000 tasks/s", _number(bulk, unit="/s"), _at_least(bulk, 30_000)),
    ]  # fmt: skip
    if "huey" in result["meta"]["systems"]:
        ahead, behind = ahead_of(summary, "huey", result["meta"]["sizes"]["memory_tasks"])
        value = f"ahead on {len(ahead)} of {len(ahead) + len(behind)}"
        if behind:
            value += "; not on: " + ", ".join(behind)
        found.append(Target("ahead of Huey on every figure", value, not behind))
    else:
        found.append(Target("ahead of Huey on every figure", "huey not in this run", None))
    return found + events_targets(result)


def events_targets(result: dict[str, Any]) -> list[Target]:
    """What events (``-E``) cost end to end, on each broker that ran both ways."""
    found = []
    for with_events, without in EVENTS_PAIRS:
        ratio = result["ratios"]["throughput_per_s"].get(ratio_name(with_events, without))
        if ratio is None:
            continue
        cost = 1 - ratio
        found.append(Target(f"{without} with -E: end-to-end cost <= {EVENTS_COST:.0%}",
                            f"{cost:+.1%}", cost <= EVENTS_COST))
    return found


def targets_section(result: dict[str, Any]) -> list[str]:
    found = targets(result)
    if not found:
        return []
    lines = ["targets (medians of this run)"]
    for target in found:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[target.met]
        lines.append(f"  {verdict:<8} {target.text:<50} {target.value}")
    return lines


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    systems = meta["systems"]
    tasks = meta["sizes"]["memory_tasks"]
    sections = [
        [
            f"taskq benchmarks: {meta['sizes']['rounds']} round(s), {meta['slots']} worker "
            f"slots per system, RabbitMQ {meta['rabbitmq']}, SQLite {meta['versions']['sqlite']}, "
            f"{meta['cpus']} CPUs, taskq {meta['versions']['taskq']} ({meta['git']}), celery "
            f"{meta['versions']['celery']}, huey {meta['versions']['huey']}",
            "↓ lower is better, ↑ higher is better; x/y ratios are x's value / y's",
            *[f"  {name}: {where}" for name, where in meta.get("places", {}).items()],
        ],
        rounds_table(result["rounds"], systems, meta["sizes"]["rounds"]),
        memory_table(result["memory"], systems, tasks),
        values_table("summary (medians)", SUMMARY_METRICS, result["summary"], systems, tasks),
        ratios_table("ratios (of the medians)", SUMMARY_METRICS, result["ratios"], tasks),
        interleaved_tables(result, systems),
        targets_section(result),
        [
            ", ".join(f"{short} = {name}" for name, short in SHORT.items())
            + "; -E: workers publishing events, no one listening; the embedded systems have "
            "no broker process (their broker work is in the client's and the worker's CPU)",
            "bulk enqueue measures: "
            + "; ".join(f"{s}: {meta['bulk_methods'][s]}" for s in systems),
            *([f"huey polls every {meta['huey_poll_s'] * 1000:g} ms (consumer and results)"]
              if meta.get("huey_poll_s") else []),
            *noise_warning(result["rounds"], result["memory"]),
            f"run took {meta['duration_s']:.0f}s",
        ],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines)
