"""The doctor's table for quantized-matmul-broadcast-weights (`report`, reached through `qmm_probes`): per bucket,
what is wrong, unsupported, crashed or not measured, and which rewrite the rule chooses; then gather_qmm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from mlxrewrite.backends.device import NOT_MEASURED, OK, Measured, Profile

from .qmm_profile import M_LABELS, ORIGINAL, QMM_REWRITES, ROW_LABELS, QmmMeasurements, QmmVerdict, measured
from .quantized_matmul_broadcast import NAME

GATHER = "gather_qmm"  # the profile section of the gather_qmm probes (qmm_probes.py): no rule reads them yet

if TYPE_CHECKING:
    from mlxrewrite.doctor.report import Footnotes

_LEGEND = (
    "The rewrite column is what the rule runs on a hazardous call (the fastest correct rewrite, then "
    "dequantize); a call is left as shipped only where it measured ok and MLX's source facts (qmm_dispatch.py) call "
    "it right too. Rows: the weights' rows (the KV length) by size class, then %A: a multiple of A (1: neither 8 "
    "nor 128). Cells: status, then max error relative to max |reference| (wrong) or median time (ok; a range over "
    "the buckets a line stands for), and [n]: the error under the tables. A bucket is wrong or unsupported if any "
    "of its probes was (M at both ends of its range; dense and sliced caches). *: not every rewrite of the bucket "
    "was measured.")


def _time_text(values: Iterable[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    if not known:
        return ""
    low, high = f"{known[0]:.0f}", f"{known[-1]:.0f}"
    return f" {low} us" if low == high else f" {low}-{high} us"


def _cell(ways: list[Measured], notes: "Footnotes") -> str:
    status = ways[0].status
    if status in (OK, NOT_MEASURED):
        return status + _time_text(m.us for m in ways)
    error = max((m.max_error for m in ways if m.max_error is not None), default=None)
    shown = f" {error:.0e}" if "wrong" in status and error is not None else ""
    return f"**{status.upper()}**{shown}{notes.ref(next((m.error for m in ways if m.error), None))}"


def _measured_at_all(verdict: QmmVerdict) -> bool:
    return any(m.status != NOT_MEASURED for m in verdict.ways.values())


def _table_order(verdict: QmmVerdict) -> tuple:
    b = verdict.bucket
    return b.dtype, b.bits, b.group_size, b.d, not b.transpose, M_LABELS.index(b.m), ROW_LABELS.index(b.rows), -b.align


def _qmm_lines(profile: QmmMeasurements, notes: "Footnotes") -> list[str]:
    """One line per measured bucket, except that buckets differing only in rows share a line when every way
    has the same status and the same rewrite is chosen in each. A rewrite marked * comes from the source
    policy less the kernel family's failures, as not every rewrite of the bucket was measured."""
    names = (ORIGINAL, *QMM_REWRITES)
    groups: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(filter(_measured_at_all, profile.verdicts.values()), key=_table_order):
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


def _unmeasured_lines(profile: QmmMeasurements) -> list[str]:
    """The buckets not measured at all, by kernel family: which M buckets, how many of the family's buckets."""
    families: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(profile.verdicts.values(), key=_table_order):
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


def _gather_lines(profile: Profile, notes: "Footnotes") -> list[str]:
    lines = ["", "## gather_qmm with broadcast indices (reported only)", "",
             "| dtype | M | d | status | max error | us |", "|---|---|---|---|---|---|"]
    for bucket in profile.rules.get(GATHER, ()):
        r, m = bucket.key, bucket.ways["gather_qmm"]
        error = "" if m.max_error is None else f"{m.max_error:.0e}"
        timed = "" if m.us is None else f"{m.us:.0f}"
        lines.append(f"| {r['dtype']} | {r['m']} | {r['d']} | {m.status}{notes.ref(m.error)} | {error} | {timed} |")
    return lines


def report(profile: Profile, notes: "Footnotes") -> list[str]:
    """The rule's part of the doctor's report (nothing where the profile has no section for it)."""
    qmm = measured(profile, NAME)
    if qmm is None:
        return []
    shown = [v for v in qmm.verdicts.values() if _measured_at_all(v)]
    shipped = [v.ways[ORIGINAL].status for v in shown if v.ways[ORIGINAL].status != NOT_MEASURED]
    return ["", "## quantized_matmul with broadcast weight batch dims (GQA quantized KV cache)", "",
            f"As shipped (measured in {len(shipped)} of the {len(shown)} buckets shown): wrong in "
            f"{sum('wrong' in s for s in shipped)}, unsupported in {sum('unsupported' in s for s in shipped)}, "
            f"crashed in {sum('crashed' in s for s in shipped)}. {_LEGEND}", "",
            *_qmm_lines(qmm, notes), *_unmeasured_lines(qmm), *_gather_lines(profile, notes)]
