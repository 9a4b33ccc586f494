"""The report: a profile as markdown: what the run did, then each rule's part (its probe module's `report`), then
each error message once."""

from __future__ import annotations

from ..backends.device import Profile
from .jit_cache import describe
from .probes import probe_modules
from .session import BUDGET_S


class Footnotes:
    """Each distinct error message once, numbered, under the tables."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def ref(self, error: str | None) -> str:
        return "" if error is None else f" [{self.numbers.setdefault(error, len(self.numbers) + 1)}]"

    def lines(self) -> list[str]:
        return ["", "## Errors", "", *(f"[{n}] {error}" for error, n in self.numbers.items())] if self.numbers else []


def _summary(profile: Profile) -> list[str]:
    notes = profile.notes
    stopped = f" Stopped: {notes['stopped']}." if notes.get("stopped") else ""
    partial = "" if notes.get("finished", True) else (
        " **This profile is partial: the run that wrote it did not finish (it was interrupted or crashed).**")
    resumed = (f" It resumed an earlier run, keeping its {notes['resumed_buckets']} measured buckets."
               if notes.get("resumed_buckets") else "")
    slowest = "; ".join(f"{label} {seconds:.1f} s" for label, seconds in notes.get("slowest", []))
    cache = [f"{describe(notes['jit_cache'])}."] if notes.get("jit_cache") else []
    in_part = notes.get("buckets", 0) - notes.get("complete_buckets", 0) - notes.get("unmeasured_buckets", 0)
    return [f"Grid `{notes.get('grid')}` (kernels: {notes.get('kernels')}, "
            f"{'in a child process' if notes.get('isolated') else 'in process'}), {notes.get('seconds')} s of a "
            f"{notes.get('budget_s', BUDGET_S):g} s budget, {notes.get('tasks_run')}/{notes.get('tasks')} tasks. "
            f"Buckets: {notes.get('complete_buckets')} measured, {notes.get('unmeasured_buckets')} not measured, "
            f"{in_part} in part.{resumed}{stopped}{partial}", "",
            f"Slowest tasks (first runs include JIT compiles): {slowest}.", *cache]


def render(profile: Profile) -> str:
    """The profile as a markdown report: the run, then what each rule's probes found."""
    footnotes = Footnotes()
    lines = [f"# mlxrewrite doctor: {profile.backend} {profile.device!r}, MLX {profile.mlx}, {profile.created}", "",
             *_summary(profile)]
    for module in probe_modules():
        lines += module.report(profile, footnotes)
    return "\n".join(lines + footnotes.lines())
