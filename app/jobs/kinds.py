"""Every kind of job: its spec type and the run that carries it out, by name.

A new kind (a dataset evaluation, a timeline, a sanity check) is a spec dataclass (``kind``,
``to_dict``, ``from_dict``, ``item_grid``) and a run class (``__init__(services, job, *,
stopping, offer_turn)`` and ``steps()``, composing ``app.pipeline``), listed here. The store,
the backends and the job routes handle every kind the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

from app.jobs.evaluate import EvaluateRun, EvaluateSpec
from app.jobs.record import Job, Spec
from app.jobs.sanity import SanityRun, SanitySpec
from app.jobs.spec import JobSpec
from app.jobs.timeline import TimelineRun, TimelineSpec
from app.jobs.visualize import VisualizeRun

if TYPE_CHECKING:
    from app.jobs.resources import JobResources


class Run(Protocol):
    def steps(self) -> Iterator[None]:
        """Do the job one unit at a time (a backend may interleave other jobs between)."""


@dataclass(frozen=True)
class JobKind:
    name: str
    spec_from_dict: Callable[[Mapping[str, Any]], Spec]
    run: Callable[..., Run]


KINDS: dict[str, JobKind] = {
    kind.name: kind for kind in (
        JobKind("visualize", JobSpec.from_dict, VisualizeRun),
        JobKind("evaluate", EvaluateSpec.from_dict, EvaluateRun),
        JobKind("timeline", TimelineSpec.from_dict, TimelineRun),
        JobKind("sanity", SanitySpec.from_dict, SanityRun),
    )}


def spec_from_record(record: Mapping[str, Any]) -> Spec:
    """The spec of a stored job record (records written before kinds existed are visualize)."""
    return KINDS[record.get("kind", "visualize")].spec_from_dict(record["spec"])


def make_run(services: "JobResources", job: Job, *, stopping: Callable[[], bool],
             offer_turn: Callable[[], None] | None = None) -> Run:
    return KINDS[job.kind].run(services, job, stopping=stopping, offer_turn=offer_turn)
