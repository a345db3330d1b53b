"""The report of a run: its results, and their formatting as text or Markdown tables.

:class:`Report` holds a run's :class:`Result` rows (every contender at one thread count)
and :class:`ScalingResult` rows (fastbn and the copy at each thread count);
:func:`format_report` prints them with a header line (machine, versions) and a footnote
on the method.
"""

import datetime
import os
import platform
import statistics
import textwrap
from dataclasses import dataclass, field

import numpy as np

import fastbn

from .cases import OP_TITLES, Case
from .load import BUSY_CORES


@dataclass
class Result:
    """Medians (ns per call) for one case, operation and thread count."""

    case: Case
    op: str
    threads: int
    medians: dict
    rounds: int
    other_load: float = None  # cores other processes kept busy meanwhile (OtherLoad)
    fastbn_layer: bool = False

    @property
    def copy(self):
        copies = ("copyto", "split-copy")
        return min(self.medians[name] for name in copies if name in self.medians)


@dataclass
class ScalingResult:
    """Medians (ns per call) of fastbn and of the copy at each thread count, for one case
    and operation."""

    case: Case
    op: str
    medians: dict  # thread count -> ns, fastbn with out=
    rounds: int
    other_load: float = None
    copy_medians: dict = field(default_factory=dict)  # thread count -> ns, the copy floor


@dataclass
class Report:
    results: list = field(default_factory=list)
    scaling: list = field(default_factory=list)
    threads: tuple = ()
    torch_version: str = None
    torch_note: str = None
    started: datetime.datetime = None
    waited_s: float = 0.0  # waiting for idle cores (wait_idle_s)
    seconds: float = 0.0


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_description():
    """CPU model and core count, e.g. ``AMD EPYC, 2 cores``."""
    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    cores = _cores()
    return f"{model}, {cores} core{'s' if cores != 1 else ''}"


def _microseconds(ns):
    us = ns / 1e3
    if us < 10:
        return f"{us:.2f}"
    if us < 100:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def _ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}×"


def threads_phrase(n):
    return f"{n} thread{'s' if n != 1 else ''}"


def header(report):
    """One line: machine, date, library versions, thread counts."""
    torch_part = f"torch {report.torch_version or report.torch_note}"
    threads = ", ".join(map(str, report.threads[:-1])) + (", " if len(report.threads) > 1 else "")
    return (
        f"fastbn {fastbn.__version__} ({fastbn.build_info()['simd']}) on {machine_description()}"
        f" · {report.started:%Y-%m-%d %H:%M %Z} · Python {platform.python_version()}"
        f" · numpy {np.__version__} · {torch_part}"
        f" · {threads}{threads_phrase(report.threads[-1])}"
    )


def _busy_mark(result):
    return " †" if result.other_load is not None and result.other_load >= BUSY_CORES else ""


def busy_warning(report):
    """A warning when other processes disturbed some measurements, else None."""
    measured = report.results + report.scaling
    busy = [r.other_load for r in measured if _busy_mark(r)]
    if not busy:
        return None
    return (
        f"Warning: other processes kept up to {max(busy):.1f} of {os.cpu_count()} cores busy"
        f" during {len(busy)} of {len(measured)} measurements (marked †). Multi-threaded"
        " timings suffer most; rerun on an idle machine (or with --wait-idle) for numbers to"
        " publish."
    )


def _result_rows(report):
    torch_used = report.torch_version is not None
    multi_threads = len(set(report.threads)) > 1
    columns = ["case", "layout", "dtype", "op"]
    if multi_threads:
        columns.append("threads")
    columns += ["fastbn µs", "out= µs"] + (["torch µs"] if torch_used else [])
    columns += ["numpy µs", "copy µs"]
    columns += (["fastbn/torch"] if torch_used else []) + ["out=/copy", "numpy/fastbn"]
    rows = []
    for result in report.results:
        medians, case = result.medians, result.case
        torch_names = [name for name in ("torch", "torch F") if name in medians]
        for torch_name in torch_names or [None]:
            op = OP_TITLES[result.op]
            if torch_name == "torch F":
                op += " vs F.batch_norm"
            elif result.fastbn_layer:
                op += " (layer)"
            op += _busy_mark(result)
            row = [case.name, case.layout, case.dtype, op]
            if multi_threads:
                row.append(str(result.threads))
            fast, into_out = medians["fastbn"], medians["fastbn out="]
            row += [_microseconds(fast), _microseconds(into_out)]
            if torch_used:
                row.append(_microseconds(medians[torch_name]) if torch_name else "—")
            row += [_microseconds(medians["numpy"]), _microseconds(result.copy)]
            if torch_used:
                row.append(_ratio(fast, medians[torch_name]) if torch_name else "—")
            row += [_ratio(into_out, result.copy), _ratio(medians["numpy"], fast)]
            rows.append(row)
    return columns, rows


def _scaling_rows(report):
    counts = sorted({n for result in report.scaling for n in result.medians})
    columns = ["case", "layout", "dtype", "op"] + [f"{threads_phrase(n)} µs" for n in counts]
    speedup = f"{counts[0]}→{counts[-1]}" if counts else ""
    columns += [f"speedup {speedup}", f"copy speedup {speedup}"]
    rows = []
    for result in report.scaling:
        op = OP_TITLES[result.op] + _busy_mark(result)
        row = [result.case.name, result.case.layout, result.case.dtype, op]
        row += [_microseconds(result.medians[n]) for n in counts]
        row.append(_ratio(result.medians[counts[0]], result.medians[counts[-1]]))
        copies = result.copy_medians
        row.append(_ratio(copies[counts[0]], copies[counts[-1]]) if copies else "—")
        rows.append(row)
    return columns, rows


def _text_table(columns, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]
    numeric = [i >= 4 for i in range(len(columns))]

    def line(cells):
        return "  ".join(
            str(cell).rjust(width) if right else str(cell).ljust(width)
            for cell, width, right in zip(cells, widths, numeric)
        ).rstrip()

    rule = line("-" * width for width in widths)
    return "\n".join([line(columns), rule] + [line(row) for row in rows])


def _markdown_table(columns, rows):
    align = ["---" if i < 4 else "--:" for i in range(len(columns))]
    lines = ["| " + " | ".join(cells) + " |" for cells in [columns, align, *rows]]
    return "\n".join(lines)


def _footnote(report):
    rounds = [r.rounds for r in report.results] + [r.rounds for r in report.scaling]
    copy_threads = [n for n in report.threads if n > 1]
    copy = "numpy.copyto"
    if copy_threads:
        counts = "/".join(map(str, copy_threads))
        copy = (f"the faster of numpy.copyto and a copy split over fastbn's {counts} threads,"
                " as its kernels split their work,")
    span = f"{min(rounds)}" if min(rounds) == max(rounds) else f"{min(rounds)}–{max(rounds)}"
    seconds = f"{report.seconds:.{0 if report.seconds >= 10 else 1}f}"
    notes = [
        f"Median time per call over {span} interleaved rounds ({seconds} s in all)."
        f" copy: {copy} of the same array into another, the floor for one read of x and one"
        " write of y. fastbn, torch and numpy return a new array each call (which the OS"
        " fills with zeros first when it is large); out=: fastbn writing into an existing"
        " array, as the copy does, and so compared with it. The thread-scaling table times"
        " fastbn with out=, and the copy (the same floor at each thread count) beside it:"
        " what a pass bound by memory bandwidth can gain from more threads.",
    ]
    if report.waited_s > 0:
        notes.append(f"Waited {report.waited_s:.0f} s in all for idle cores between measurements.")
    loads = [r.other_load for r in report.results + report.scaling if r.other_load is not None]
    if loads:
        notes.append(
            f"Other processes kept {statistics.mean(loads):.2f} cores busy on average during"
            f" the measurements (at most {max(loads):.2f})."
        )
    if report.torch_version:
        notes.append(
            "torch: torch.ops.aten.native_batch_norm / native_batch_norm_backward under"
            " no_grad, channels_last tensors for NHWC, same thread count."
        )
    if any(r.fastbn_layer for r in report.results):
        notes.append("(layer): fastbn.BatchNorm in eval mode, called on the example.")
    return notes


def format_report(report, markdown=False):
    """The report as text: a header line, the comparison table, the thread-scaling table."""
    table = _markdown_table if markdown else _text_table
    parts = [(f"**{header(report)}**" if markdown else header(report)), ""]
    warning = busy_warning(report)
    if warning:
        parts += [warning, ""]
    if report.results:
        parts += [table(*_result_rows(report)), ""]
    if report.scaling:
        parts += ["Thread scaling:", "", table(*_scaling_rows(report)), ""]
    if report.results or report.scaling:
        notes = " ".join(_footnote(report))
        parts += [notes if markdown else textwrap.fill(notes, 100)]
    else:
        parts += ["Nothing to measure: no selected case has a selected operation."]
    return "\n".join(parts)
