"""Errors with a stable code and a user-safe, one-sentence message.

Every failure a user can cause or meet is one of these classes. The HTTP layer maps them to a
status and ``{"error": {"code", "message", "fields"?}}``; the CLI prints the code and message.
Messages never contain tracebacks or server paths. This module is import-light (no Flask, no
torch) so plugins can raise these errors.
"""
from __future__ import annotations

from typing import Any


class ConvscopeError(Exception):
    """Base class: subclasses set ``code`` and ``http_status``."""

    code = "E_INTERNAL"
    http_status = 500
    default_message = "An internal error occurred."

    def __init__(self, message: str | None = None, *, fields: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.fields = dict(fields or {})
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message})"


def _error(name: str, code: str, status: int, default: str) -> type[ConvscopeError]:
    return type(name, (ConvscopeError,), {"code": code, "http_status": status,
                                         "default_message": default, "__module__": __name__})


# Input: parameters, names, ids.
BadParameter = _error("BadParameter", "E_BAD_PARAMETER", 400, "A parameter is invalid.")
BadRequest = _error("BadRequest", "E_BAD_REQUEST", 400, "The request is malformed.")
NotFound = _error("NotFound", "E_NOT_FOUND", 404, "Not found.")
UnknownVisualization = _error("UnknownVisualization", "E_UNKNOWN_VISUALIZATION", 400,
                              "Unknown visualization.")
UnknownModel = _error("UnknownModel", "E_UNKNOWN_MODEL", 404, "Unknown model.")
UnknownClass = _error("UnknownClass", "E_UNKNOWN_CLASS", 400, "Unknown class.")
TooExpensive = _error("TooExpensive", "E_TOO_EXPENSIVE", 422,
                      "The request needs too many model evaluations.")
MethodUnsupported = _error("MethodUnsupported", "E_METHOD_UNSUPPORTED", 422,
                           "This visualization does not support this model.")

# Images.
ImageEmpty = _error("ImageEmpty", "E_IMAGE_EMPTY", 400, "The uploaded file is empty.")
ImageUnsupported = _error("ImageUnsupported", "E_IMAGE_UNSUPPORTED", 415,
                          "The file is not an image in a supported format.")
ImageCorrupt = _error("ImageCorrupt", "E_IMAGE_CORRUPT", 400, "The image file is damaged.")
ImageTooLarge = _error("ImageTooLarge", "E_IMAGE_TOO_LARGE", 413, "The image is too large.")
ImageTooSmall = _error("ImageTooSmall", "E_IMAGE_TOO_SMALL", 400, "The image is too small.")
ImageAspectRatio = _error("ImageAspectRatio", "E_IMAGE_ASPECT_RATIO", 400,
                          "The image is too long and narrow.")
TooManyFiles = _error("TooManyFiles", "E_TOO_MANY_FILES", 413, "Too many files in one request.")
PayloadTooLarge = _error("PayloadTooLarge", "E_PAYLOAD_TOO_LARGE", 413,
                         "The request body is too large.")

# Checkpoints and configuration.
ConfigInvalid = _error("ConfigInvalid", "E_CONFIG_INVALID", 422, "convscope.toml is invalid.")
CheckpointUnreadable = _error("CheckpointUnreadable", "E_CHECKPOINT_UNREADABLE", 422,
                              "The checkpoint file cannot be read.")
CheckpointUnrecognized = _error("CheckpointUnrecognized", "E_CHECKPOINT_UNRECOGNIZED", 422,
                                "The checkpoint does not match any known architecture.")
CheckpointMismatch = _error("CheckpointMismatch", "E_CHECKPOINT_MISMATCH", 422,
                            "The checkpoint's weights do not match the model.")
CheckpointNonfinite = _error("CheckpointNonfinite", "E_CHECKPOINT_NONFINITE", 422,
                             "The checkpoint contains NaN or infinite weights.")
CheckpointNeedsTrust = _error("CheckpointNeedsTrust", "E_CHECKPOINT_NEEDS_TRUST", 422,
                              "Loading this checkpoint would execute code; pass --trust-code "
                              "(or set CONVSCOPE_TRUST_CODE=1) to allow it.")
LabelsMismatch = _error("LabelsMismatch", "E_LABELS_MISMATCH", 422,
                        "The labels file does not match the model's number of classes.")

# Datasets (dataset mode: a labelled folder evaluated as a whole).
DatasetNotFound = _error("DatasetNotFound", "E_DATASET_NOT_FOUND", 404,
                         "The dataset folder does not exist.")
DatasetEmpty = _error("DatasetEmpty", "E_DATASET_EMPTY", 422, "The dataset has no images.")
DatasetLabels = _error("DatasetLabels", "E_DATASET_LABELS", 422,
                       "The dataset's labels do not match the model's classes.")
DatasetTooLarge = _error("DatasetTooLarge", "E_DATASET_TOO_LARGE", 413,
                         "The dataset has more images than this server evaluates at once.")
# Skipped files of a dataset (listed with their code, never fatal).
DatasetOutside = _error("DatasetOutside", "E_DATASET_OUTSIDE", 403,
                        "This path leads outside the dataset folder; it was not followed.")
NotFinished = _error("NotFinished", "E_NOT_FINISHED", 409, "The job has not finished yet.")
FileUnreadable = _error("FileUnreadable", "E_FILE_UNREADABLE", 422, "The file cannot be read.")

# Running.
ModelOutputInvalid = _error("ModelOutputInvalid", "E_MODEL_OUTPUT_INVALID", 500,
                            "The model produced NaN or infinite values.")
DeviceOOM = _error("DeviceOOM", "E_DEVICE_OOM", 503, "The device ran out of memory.")
DeviceUnavailable = _error("DeviceUnavailable", "E_DEVICE_UNAVAILABLE", 500,
                           "The requested device is not available.")
Cancelled = _error("Cancelled", "E_CANCELLED", 409, "The job was cancelled.")
Busy = _error("Busy", "E_BUSY", 503, "The server is busy; try again shortly.")
BrokerUnavailable = _error("BrokerUnavailable", "E_BROKER_UNAVAILABLE", 503,
                           "The job queue (Redis) cannot be reached; try again shortly.")
WorkerLost = _error("WorkerLost", "E_WORKER_LOST", 500,
                    "The workers running this job were lost three times; it was given up.")
NotReady = _error("NotReady", "E_NOT_READY", 503, "The server is not ready; try again shortly.")
StorageFull = _error("StorageFull", "E_STORAGE_FULL", 507, "The server's storage is full.")
ResultExpired = _error("ResultExpired", "E_RESULT_EXPIRED", 410,
                       "This result has expired and was removed.")
Unauthorized = _error("Unauthorized", "E_UNAUTHORIZED", 401, "Authentication is required.")
BadHost = _error("BadHost", "E_BAD_HOST", 400, "This server does not answer to this host name.")
Forbidden = _error("Forbidden", "E_FORBIDDEN", 403, "This request is not allowed.")
Internal = _error("Internal", "E_INTERNAL", 500, "An internal error occurred.")
