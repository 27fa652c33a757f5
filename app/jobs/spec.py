"""What a job asks for: a ``JobSpec``, validated completely when the job is submitted
(``app.views.job_requests``), so the queue only ever holds work that can run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from app.pipeline import MethodRequest, ModelIdentity


@dataclass(frozen=True)
class JobSpec:
    """A validated visualization job: everything a run needs, nothing it has to check again."""

    model_id: str
    model_file: str
    checkpoint_sha256: str
    meta_fingerprint: str
    images: tuple[str, ...]
    filenames: tuple[str, ...]
    methods: tuple[MethodRequest, ...]
    targets: tuple[int | str, ...]            # app.pipeline.PREDICTED or a class index
    true_labels: Mapping[str, int]            # image id -> class index
    # Score every panel's faithfulness (app.faithfulness_scores). A record written before
    # scoring existed reads as False: its cost was checked without it.
    faithfulness: bool = False

    kind: ClassVar[str] = "visualize"

    def item_grid(self) -> tuple[int, int]:
        return len(self.images), len(self.methods)

    @property
    def model(self) -> ModelIdentity:
        return ModelIdentity(self.checkpoint_sha256, self.meta_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_file": self.model_file,
                "checkpoint_sha256": self.checkpoint_sha256,
                "meta_fingerprint": self.meta_fingerprint, "images": list(self.images),
                "filenames": list(self.filenames),
                "methods": [method.to_dict() for method in self.methods],
                "targets": list(self.targets), "true_labels": dict(self.true_labels),
                "faithfulness": self.faithfulness}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        return cls(model_id=data["model_id"], model_file=data["model_file"],
                   checkpoint_sha256=data["checkpoint_sha256"],
                   meta_fingerprint=data["meta_fingerprint"], images=tuple(data["images"]),
                   filenames=tuple(data["filenames"]),
                   methods=tuple(MethodRequest.from_dict(m) for m in data["methods"]),
                   targets=tuple(data["targets"]), true_labels=dict(data["true_labels"]),
                   faithfulness=bool(data.get("faithfulness", False)))
