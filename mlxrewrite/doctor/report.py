"""The report: a profile as a markdown table of what is wrong, unsupported, crashed or not measured, and what
the rules choose, per bucket; then the SDPA and gather_qmm rows, and each error message once."""

from __future__ import annotations

from typing import Iterable

from ..policy import M_LABELS, NOT_MEASURED, OK, ORIGINAL, QMM_REWRITES, ROW_LABELS, Measured, Profile, QmmVerdict
from .jit_cache import describe
from .session import BUDGET_S


def _time_text(values: Iterable[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    if not known:
        return ""
    low, high = f"{known[0]:.0f}", f"{known[-1]:.0f}"
    return f" {low} us" if low == high else f" {low}-{high} us"


class _Footnotes:
    """Each distinct error message once, numbered, under the tables."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def ref(self, error: str | None) -> str:
        return "" if error is None else f" [{self.numbers.setdefault(error, len(self.numbers) + 1)}]"

    def lines(self) -> list[str]:
        return ["", "## Errors", "", *(f"[{n}] {error}" for error, n in self.numbers.items())] if self.numbers else []


def _cell(measured: list[Measured], notes: _Footnotes) -> str:
    status = measured[0].status
    if status in (OK, NOT_MEASURED):
        return status + _time_text(m.us for m in measured)
    error = max((m.max_error for m in measured if m.max_error is not None), default=None)
    shown = f" {error:.0e}" if "wrong" in status and error is not None else ""
    return f"**{status.upper()}**{shown}{notes.ref(next((m.error for m in measured if m.error), None))}"


def _measured_at_all(verdict: QmmVerdict) -> bool:
    return any(m.status != NOT_MEASURED for m in verdict.ways.values())


def _table_order(verdict: QmmVerdict) -> tuple:
    b = verdict.bucket
    return b.dtype, b.bits, b.group_size, b.d, not b.transpose, M_LABELS.index(b.m), ROW_LABELS.index(b.rows), -b.align


def _qmm_lines(profile: Profile, notes: _Footnotes) -> list[str]:
    """One line per measured bucket, except that buckets differing only in rows share a line when every way
    has the same status and the same rewrite is chosen in each. A rewrite marked * comes from the source
    policy less the kernel family's failures, as not every rewrite of the bucket was measured."""
    names = (ORIGINAL, *QMM_REWRITES)
    groups: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(filter(_measured_at_all, profile.qmm.values()), key=_table_order):
        b = verdict.bucket
        groups.setdefault((b.dtype, b.bits, b.group_size, b.transpose, b.m, b.d), []).append(verdict)
    lines = ["| dtype | bits/group | transpose | M | d | rows | as shipped | fold | copy | dequantize | rewrite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dtype, bits, group, transpose, m, d), verdicts in groups.items():
        chosen = {v.bucket: profile.hazard_ways(v.bucket)[0][0] + ("" if v.complete else "*") for v in verdicts}
        signature = {(tuple(v.ways[n].status for n in names), chosen[v.bucket]) for v in verdicts}
        for part in [[v] for v in verdicts] if len(signature) > 1 else [verdicts]:
            rows = f"{part[0].bucket.rows} %{part[0].bucket.align}" if len(part) == 1 else f"all {len(part)} classes"
            cells = [_cell([v.ways[n] for v in part], notes) for n in names]
            lines.append(f"| {dtype} | {bits}/{group} | {transpose} | {m} | {d} | {rows} | {' | '.join(cells)} "
                         f"| {chosen[part[0].bucket]} |")
    return lines


def _unmeasured_lines(profile: Profile) -> list[str]:
    """The buckets not measured at all, by kernel family: which M buckets, how many of the family's buckets."""
    families: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(profile.qmm.values(), key=_table_order):
        families.setdefault(verdict.bucket.family, []).append(verdict)
    lines = []
    for (dtype, _mode, bits, group, transpose, d), verdicts in families.items():
        missing = [v for v in verdicts if not _measured_at_all(v)]
        if missing:
            m_labels = ", ".join(dict.fromkeys(v.bucket.m for v in missing))
            lines.append(f"| {dtype} | {bits}/{group} | {transpose} | {d} | {len(missing)} of {len(verdicts)} | "
                         f"{m_labels} |")
    if not lines:
        return []
    return ["", "### Not measured (the time budget ran out first)", "",
            "These keep the source-derived policy (fold, else copy), less any rewrite that failed in a measured "
            "bucket of the same dtype, bits, group, transpose and d.", "",
            "| dtype | bits/group | transpose | d | buckets | M |", "|---|---|---|---|---|---|", *lines]


def _summary(profile: Profile) -> list[str]:
    notes = profile.notes
    verdicts = list(profile.qmm.values())
    stopped = f" Stopped: {notes['stopped']}." if notes.get("stopped") else ""
    partial = "" if notes.get("finished", True) else (
        " **This profile is partial: the run that wrote it did not finish (it was interrupted or crashed).**")
    resumed = (f" It resumed an earlier run, keeping its {notes['resumed_buckets']} measured buckets."
               if notes.get("resumed_buckets") else "")
    slowest = "; ".join(f"{label} {seconds:.1f} s" for label, seconds in notes.get("slowest", []))
    cache = [f"{describe(notes['jit_cache'])}."] if notes.get("jit_cache") else []
    return [f"Grid `{notes.get('grid')}` (kernels: {notes.get('kernels')}, "
            f"{'in a child process' if notes.get('isolated') else 'in process'}), {notes.get('seconds')} s of a "
            f"{notes.get('budget_s', BUDGET_S):g} s budget, {notes.get('tasks_run')}/{notes.get('tasks')} tasks. "
            f"Buckets: {notes.get('complete_buckets')} measured, {notes.get('unmeasured_buckets')} not measured, "
            f"{len(verdicts) - notes.get('complete_buckets', 0) - notes.get('unmeasured_buckets', 0)} in part."
            f"{resumed}{stopped}{partial}", "", f"Slowest tasks (first runs include JIT compiles): {slowest}.", *cache]


_QMM_LEGEND = (
    "The rewrite column is what the rule runs on a hazardous call (the fastest correct rewrite, then "
    "dequantize); a call is left as shipped only where it measured ok and MLX's source facts (policy.py) call it "
    "right too. Rows: the weights' rows (the KV length) by size class, then %A: a multiple of A (1: neither 8 nor "
    "128). Cells: status, then max error relative to max |reference| (wrong) or median time (ok; a range over the "
    "buckets a line stands for), and [n]: the error under the tables. A bucket is wrong or unsupported if any of "
    "its probes was (M at both ends of its range; dense and sliced caches). *: not every rewrite of the bucket was "
    "measured.")


def render(profile: Profile) -> str:
    """The profile as a markdown report: what is wrong, unsupported, crashed or not measured, and what the
    rules choose, per bucket."""
    notes = profile.notes
    footnotes = _Footnotes()
    measured = [v for v in profile.qmm.values() if _measured_at_all(v)]
    shipped = [v.ways[ORIGINAL].status for v in measured if v.ways[ORIGINAL].status != NOT_MEASURED]
    lines = [f"# mlxrewrite doctor: {profile.backend} {profile.device!r}, MLX {profile.mlx}, {profile.created}", "",
             *_summary(profile), "",
             "## quantized_matmul with broadcast weight batch dims (GQA quantized KV cache)", "",
             f"As shipped (measured in {len(shipped)} of the {len(measured)} buckets shown): wrong in "
             f"{sum('wrong' in s for s in shipped)}, unsupported in {sum('unsupported' in s for s in shipped)}, "
             f"crashed in {sum('crashed' in s for s in shipped)}. {_QMM_LEGEND}", ""]
    lines += _qmm_lines(profile, footnotes) + _unmeasured_lines(profile)
    lines += ["", "## scaled_dot_product_attention: all-True mask vs mask=None", "",
              "| dtype | d | queries | keys | status | max diff | None us | mask us | mask / None |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in notes.get("sdpa", []):
        timed = (f"{r['max_diff']:.0e} | {r['none_us']:.0f} | {r['mask_us']:.0f} | {r['mask_over_none']:.2f}x"
                 if "mask_us" in r else f"{footnotes.ref(r.get('error')).strip()} | | |")
        lines.append(f"| {r['dtype']} | {r['d']} | {r['queries']} | {r['keys']} | {r['status']} | {timed} |")
    lines += ["", "## gather_qmm with broadcast indices (reported only)", "",
              "| dtype | M | d | status | max error | us |", "|---|---|---|---|---|---|"]
    for r in notes.get("gather_qmm", []):
        error = "" if r["max_error"] is None else f"{r['max_error']:.0e}"
        timed = "" if r["us"] is None else f"{r['us']:.0f}"
        lines.append(f"| {r['dtype']} | {r['m']} | {r['d']} | {r['status']}{footnotes.ref(r['error'])} | {error} "
                     f"| {timed} |")
    return "\n".join(lines + footnotes.lines())
