"""What an evaluation found, computed from its per-image records: pure numpy, no I/O.

``ImageRecords`` is the per-image outcome every dataset-wide feature starts from -- this page's
accuracy, confusion matrix and failure cases, the calibration of issue 16, the accuracy per
checkpoint and the flips between checkpoints of issue 11: for each evaluated file its true class,
its top-k classes with their probabilities, and the probability of its true class.

Conventions (the ``evaluation.json`` contract):

* the confusion matrix's rows are the dataset's classes (model index order), its columns the same
  classes plus one final "other" column when some prediction falls outside them;
* ``failures`` are the wrong images, most confident first (ties in file order);
* "least certain correct": right images by the margin between their top two probabilities;
* "confidently wrong": the failures whose top-1 probability is at least ``CONFIDENTLY_WRONG``
  (0.8 by default; the evaluation page takes another level as ``?confident=``), most confident
  first -- the images a softmax probability would have you trust and should not;
* calibration: 15 equal-width bins of the top-1 probability, ``[lower, upper)`` with the last
  bin closed; ECE = sum over bins of (count / N) * |accuracy - confidence|;
* temperature scaling (Guo, Pleiss, Sun & Weinberger 2017): one temperature T, fitted on the
  evaluated images themselves by minimizing the negative log-likelihood of softmax(logits / T)
  (a bounded golden-section search over log T), and the ECE before and after. Fitted and
  judged on the same data, the "after" is optimistic: it shows how much of the miscalibration
  one number can explain, not what a held-out set would see. It needs every class's
  probability (the logits up to a constant): when the stored top-k leaves classes out, it is
  not fitted and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CALIBRATION_BINS = 15
TOP_CONFUSIONS = 20
LEAST_CERTAIN = 100
CONFIDENTLY_WRONG = 0.8     # top-1 probability from which a failure counts as confidently wrong
TEMPERATURE_RANGE = (0.05, 20.0)
_SEARCH_ITERATIONS = 40     # golden-section steps: 0.618 ** 40 of log(400) is ~1e-8


@dataclass(frozen=True)
class ImageRecords:
    """Per-image results in file order (columnar, so 100,000 images cost a few MB)."""

    paths: tuple[str, ...]
    targets: np.ndarray             # (n,) int64 true class index
    top_indices: np.ndarray         # (n, k) int64, best first
    top_probabilities: np.ndarray   # (n, k) float32
    true_probabilities: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def predicted(self) -> np.ndarray:
        return self.top_indices[:, 0]

    @property
    def probability(self) -> np.ndarray:
        """The top-1 probability (the model's confidence)."""
        return self.top_probabilities[:, 0]

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.targets

    @property
    def margin(self) -> np.ndarray:
        """Top-1 minus top-2 probability (1.0 for a one-class model)."""
        if self.top_probabilities.shape[1] < 2:
            return np.ones(len(self), dtype=np.float32)
        return self.top_probabilities[:, 0] - self.top_probabilities[:, 1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"targets": self.targets, "top_indices": self.top_indices,
                "top_probabilities": self.top_probabilities,
                "true_probabilities": self.true_probabilities}

    @classmethod
    def from_arrays(cls, paths: Sequence[str], arrays: Any) -> "ImageRecords":
        return cls(tuple(paths), np.asarray(arrays["targets"], dtype=np.int64),
                   np.asarray(arrays["top_indices"], dtype=np.int64),
                   np.asarray(arrays["top_probabilities"], dtype=np.float32),
                   np.asarray(arrays["true_probabilities"], dtype=np.float32))

    @classmethod
    def empty(cls, k: int) -> "ImageRecords":
        return cls((), np.zeros(0, np.int64), np.zeros((0, k), np.int64),
                   np.zeros((0, k), np.float32), np.zeros(0, np.float32))

    @classmethod
    def concatenate(cls, parts: Sequence["ImageRecords"], k: int) -> "ImageRecords":
        parts = [part for part in parts if len(part)]
        if not parts:
            return cls.empty(k)
        return cls(tuple(path for part in parts for path in part.paths),
                   np.concatenate([part.targets for part in parts]),
                   np.concatenate([part.top_indices for part in parts]),
                   np.concatenate([part.top_probabilities for part in parts]),
                   np.concatenate([part.true_probabilities for part in parts]))


def top_k_accuracy(records: ImageRecords, k: int) -> float | None:
    if not len(records):
        return None
    hits = (records.top_indices[:, :k] == records.targets[:, None]).any(axis=1)
    return float(hits.mean())


def class_table(records: ImageRecords, classes: Sequence[int],
                class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per dataset class: support, correct, precision (over every image predicted as it) and
    recall; None where the denominator is 0."""
    num = len(class_names)
    support = np.bincount(records.targets, minlength=num)
    predicted = np.bincount(records.predicted, minlength=num)
    correct = np.bincount(records.targets[records.correct], minlength=num)
    rows = []
    for index in classes:
        rows.append({"index": int(index), "label": class_names[index],
                     "support": int(support[index]), "correct": int(correct[index]),
                     "precision": (float(correct[index] / predicted[index])
                                   if predicted[index] else None),
                     "recall": float(correct[index] / support[index]) if support[index] else None,
                     "predicted": int(predicted[index])})
    return rows


def confusion(records: ImageRecords, classes: Sequence[int]) -> dict[str, Any]:
    """Rows: true classes; columns: predicted, over ``classes`` plus "other" when needed."""
    size = len(classes)
    position = {index: number for number, index in enumerate(classes)}
    rows = np.fromiter((position[int(t)] for t in records.targets), dtype=np.int64,
                       count=len(records))
    lookup = np.full(max(int(records.predicted.max(initial=0)), max(classes, default=0)) + 1,
                     size, dtype=np.int64)
    for index, number in position.items():
        lookup[index] = number
    columns = lookup[records.predicted]
    matrix = np.bincount(rows * (size + 1) + columns,
                         minlength=size * (size + 1)).reshape(size, size + 1)
    other = bool(matrix[:, size].any())
    if not other:
        matrix = matrix[:, :size]
    return {"labels": [int(index) for index in classes], "matrix": matrix.tolist(),
            "other_column": other}


def failure_order(records: ImageRecords) -> np.ndarray:
    """Numbers of the wrong images, most confident first (ties in file order)."""
    wrong = np.flatnonzero(~records.correct)
    return wrong[np.argsort(-records.probability[wrong], kind="stable")]


def confidently_wrong(records: ImageRecords, level: float = CONFIDENTLY_WRONG) -> np.ndarray:
    """Numbers of the wrong images with a top-1 probability of at least ``level``, most
    confident first (ties in file order): the head of ``failure_order``."""
    failures = failure_order(records)
    return failures[records.probability[failures].astype(np.float64) >= level]


def confidently_wrong_record(records: ImageRecords,
                             level: float = CONFIDENTLY_WRONG) -> dict[str, Any]:
    """``evaluation.json``'s ``confidently_wrong``: the level and the files, most confident
    first."""
    return {"level": level,
            "images": [records.paths[number] for number in confidently_wrong(records, level)]}


def least_certain_correct(records: ImageRecords, limit: int = LEAST_CERTAIN) -> np.ndarray:
    """Numbers of the right images with the smallest margin between their top two classes."""
    right = np.flatnonzero(records.correct)
    return right[np.argsort(records.margin[right], kind="stable")][:limit]


def top_confusions(records: ImageRecords, class_names: Sequence[str],
                   limit: int = TOP_CONFUSIONS) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) pairs among the failures, with their counts."""
    wrong = ~records.correct
    if not wrong.any():
        return []
    num = len(class_names)
    pairs, counts = np.unique(records.targets[wrong] * num + records.predicted[wrong],
                              return_counts=True)
    order = np.lexsort((pairs, -counts))[:limit]
    return [{"true": {"index": int(pairs[i] // num), "label": class_names[pairs[i] // num]},
             "predicted": {"index": int(pairs[i] % num), "label": class_names[pairs[i] % num]},
             "count": int(counts[i])} for i in order]


def calibration(records: ImageRecords, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (all of them; empty ones
    with count 0 and null accuracy and confidence)."""
    confidence = records.probability.astype(np.float64)
    correct = records.correct.astype(np.float64)
    which = np.clip(np.floor(confidence * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    confidence_sums = np.bincount(which, weights=confidence, minlength=bins)
    correct_sums = np.bincount(which, weights=correct, minlength=bins)
    total = max(len(records), 1)
    rows, ece = [], 0.0
    for number in range(bins):
        count = int(counts[number])
        accuracy = correct_sums[number] / count if count else None
        mean_confidence = confidence_sums[number] / count if count else None
        if count:
            ece += count / total * abs(accuracy - mean_confidence)
        rows.append({"lower": number / bins, "upper": (number + 1) / bins, "count": count,
                     "accuracy": None if accuracy is None else float(accuracy),
                     "confidence": None if mean_confidence is None else float(mean_confidence)})
    return {"ece": float(ece) if len(records) else None, "bins": rows}


def _scaled(log_probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(logits / T) per row, from log softmax(logits) (the same up to a constant)."""
    scaled = log_probabilities / temperature
    return scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)


def temperature_scaling(records: ImageRecords, num_classes: int,
                        bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """One temperature fitted on ``records`` (see the module docstring), with the NLL and ECE
    before and after; ``{"fitted": False, "reason": ...}`` when it cannot be fitted."""
    method = ("temperature scaling (Guo et al. 2017): softmax(logits / T), T minimizing the "
              "negative log-likelihood of the true classes")
    stored = records.top_probabilities.shape[1]
    if not len(records):
        return {"fitted": False, "method": method, "reason": "No images were evaluated."}
    if stored < num_classes:
        return {"fitted": False, "method": method,
                "reason": f"It needs every class's probability; this evaluation kept the top "
                          f"{stored} of {num_classes} (evaluate with --top-k {num_classes}, or "
                          f"\"top_k\": {num_classes} in the API)."}
    # Columns in class order, so the true class is a column index; float32 zeros (classes
    # beyond float32's range) are clipped to its smallest positive value.
    full = np.empty((len(records), num_classes), dtype=np.float64)
    np.put_along_axis(full, records.top_indices, records.top_probabilities.astype(np.float64),
                      axis=1)
    log_p = np.log(np.clip(full, np.finfo(np.float32).tiny, None))
    rows = np.arange(len(records))

    def nll(log_temperature: float) -> float:
        return float(-_scaled(log_p, float(np.exp(log_temperature)))[rows, records.targets]
                     .mean())

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    for _ in range(_SEARCH_ITERATIONS):     # NLL is convex in 1/T, so unimodal in log T
        if nll_a <= nll_b:
            high, b, nll_b = b, a, nll_a
            a = low + (1 - ratio) * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    temperature = round(float(np.exp((low + high) / 2)), 4)   # every figure uses the one stated
    scaled = np.exp(_scaled(log_p, temperature))
    # T > 0 keeps every ranking, so the top-1 (and accuracy) stays; only confidence moves.
    top1 = records.top_indices[:, :1]
    after = ImageRecords(records.paths, records.targets, top1,
                         np.take_along_axis(scaled, top1, axis=1).astype(np.float32),
                         scaled[rows, records.targets].astype(np.float32))
    calibrated = calibration(after, bins)
    return {"fitted": True, "method": method,
            "fitted_on": "the evaluated images themselves (no held-out split): the ECE after "
                         "is optimistic",
            "temperature": temperature,
            "nll_before": nll(0.0), "nll_after": nll(float(np.log(temperature))),
            "ece_before": calibration(records, bins)["ece"], "ece_after": calibrated["ece"],
            "bins_after": calibrated["bins"]}


def summarize(records: ImageRecords, classes: Sequence[int],
              class_names: Sequence[str]) -> dict[str, Any]:
    """Everything ``evaluation.json`` says beyond the per-image list, with images named by
    their number in ``records`` (``failures``, ``least_certain_correct``)."""
    return {"accuracy": float(records.correct.mean()) if len(records) else None,
            "top5_accuracy": top_k_accuracy(records, 5),
            "classes": class_table(records, classes, class_names),
            "confusion": confusion(records, classes),
            "top_confusions": top_confusions(records, class_names),
            "calibration": calibration(records),
            "temperature_scaling": temperature_scaling(records, len(class_names)),
            "failures": failure_order(records).tolist(),
            "least_certain_correct": least_certain_correct(records).tolist()}


def image_record(records: ImageRecords, number: int, class_names: Sequence[str],
                 top_k: int) -> dict[str, Any]:
    """One image of ``evaluation.json``'s ``images`` list."""
    true_index = int(records.targets[number])
    predicted = int(records.top_indices[number, 0])
    return {"number": number, "file": records.paths[number],
            "true": {"index": true_index, "label": class_names[true_index]},
            "predicted": {"index": predicted, "label": class_names[predicted],
                          "probability": float(records.top_probabilities[number, 0])},
            "true_probability": float(records.true_probabilities[number]),
            "correct": predicted == true_index,
            "margin": float(records.margin[number]),
            "top": [{"index": int(index), "label": class_names[int(index)],
                     "probability": float(probability)}
                    for index, probability in zip(records.top_indices[number, :top_k],
                                                  records.top_probabilities[number, :top_k])]}
