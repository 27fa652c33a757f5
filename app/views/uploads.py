"""Uploaded files -> stored images, shared by the API and the no-JavaScript workbench form.

Bounded before anything is decoded: the number of files, and the pixels their headers claim in
total (``CONVSCOPE_MAX_REQUEST_MEGAPIXELS``: one request of sixteen 49-megapixel PNGs is 2 MB
on the wire and minutes of CPU). Identical files in one request are decoded once. Each decode
then holds part of the process's decode budget (``CONVSCOPE_DECODE_BUDGET_MB``, see
app/decode_budget.py) while it runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any, Sequence

from flask import current_app
from werkzeug.datastructures import FileStorage

from app.decode_budget import DecodeBudget
from app.errors import BadRequest, ConvscopeError, ImageTooLarge, StorageFull, TooManyFiles
from app.stores import ImageRecord, ImageStore

UPLOAD_FIELD = "image"
_BUDGET_EXTENSION = "convscope_decode_budget"
_budget_lock = threading.Lock()
# Used when the app has no settings (a bare Flask app in a test): the Settings defaults.
_DEFAULT_BUDGET_MB = 512.0
_DEFAULT_MAX_REQUEST_MEGAPIXELS = 100.0


def store_uploads(files: Sequence[FileStorage], images: ImageStore, *,
                  max_files: int) -> list[ImageRecord]:
    """Ingest and store every file; the first bad file fails the request, naming its position
    (the files before it are stored, which is harmless: storage is by content)."""
    from app.ingest import header_pixels, ingest_image, safe_display_name

    if len(files) > max_files:
        raise TooManyFiles(f"{len(files)} files were sent; at most {max_files} are allowed "
                           "in one request.", fields={UPLOAD_FIELD: f"at most {max_files} files"})
    # A form's file input with nothing chosen still sends an empty part without a name.
    uploads = [(f.filename or "", f.read()) for f in files]
    uploads = [(name, data) for name, data in uploads if name or data]
    if not uploads:
        raise BadRequest(f"No file was uploaded in the form field {UPLOAD_FIELD!r}.",
                         fields={UPLOAD_FIELD: "one or more image files"})
    digests = [hashlib.sha256(data).digest() for _, data in uploads]
    distinct = {digest: data for digest, (_, data) in zip(digests, uploads)}
    _check_request_pixels(sum(header_pixels(data) for data in distinct.values()), len(distinct))
    budget = decode_budget()
    ingested: dict[bytes, Any] = {}
    records = []
    for position, ((name, data), digest) in enumerate(zip(uploads, digests), start=1):
        where = {UPLOAD_FIELD: f"file {position} of {len(uploads)}"}
        try:
            if digest not in ingested:
                ingested[digest] = ingest_image(data, name, budget=budget)
            image = dataclasses.replace(ingested[digest], filename=safe_display_name(name))
            records.append(images.put(image))
        except StorageFull:
            raise StorageFull("The server's storage is full, so the upload cannot be stored; "
                              "try again later or ask the administrator to free space.",
                              fields=where) from None
        except ConvscopeError as error:
            for field, value in where.items():
                error.fields.setdefault(field, value)
            raise
    return records


def _settings() -> Any:
    services = current_app.extensions.get("convscope")
    return getattr(services, "settings", None)


def decode_budget() -> DecodeBudget:
    """This app's decode budget (one per app, shared by its request threads)."""
    budget = current_app.extensions.get(_BUDGET_EXTENSION)
    if budget is None:
        with _budget_lock:
            budget = current_app.extensions.get(_BUDGET_EXTENSION)
            if budget is None:
                settings = _settings()
                megabytes = getattr(settings, "decode_budget_mb", _DEFAULT_BUDGET_MB)
                retry_after = getattr(settings, "retry_after_s", 5)
                budget = DecodeBudget(int(megabytes * 1024 * 1024), retry_after_s=retry_after)
                current_app.extensions[_BUDGET_EXTENSION] = budget
    return budget


def _check_request_pixels(total_pixels: int, count: int) -> None:
    from app.ingest import megapixels_apart

    limit_mp = getattr(_settings(), "max_request_megapixels", _DEFAULT_MAX_REQUEST_MEGAPIXELS)
    limit = int(limit_mp * 1_000_000)
    if total_pixels <= limit:
        return
    shown, limit_shown = megapixels_apart(total_pixels, limit)
    images = "image has" if count == 1 else f"{count} images have"
    raise ImageTooLarge(f"The {images} {shown} megapixels in total; one request may carry "
                        f"at most {limit_shown} megapixels, so upload them in several requests.",
                        fields={UPLOAD_FIELD: f"at most {limit_shown} megapixels per request"})
