"""Uploaded files -> stored images, shared by the API and the no-JavaScript workbench form."""
from __future__ import annotations

from typing import Sequence

from werkzeug.datastructures import FileStorage

from app.errors import BadRequest, ConvscopeError, TooManyFiles
from app.stores import ImageRecord, ImageStore

UPLOAD_FIELD = "image"


def store_uploads(files: Sequence[FileStorage], images: ImageStore, *,
                  max_files: int) -> list[ImageRecord]:
    """Ingest and store every file; the first bad file fails the request, naming its position
    (the files before it are stored, which is harmless: storage is by content)."""
    from app.ingest import ingest_image

    if len(files) > max_files:
        raise TooManyFiles(f"{len(files)} files were sent; at most {max_files} are allowed "
                           "in one request.", fields={UPLOAD_FIELD: f"at most {max_files} files"})
    # A form's file input with nothing chosen still sends an empty part without a name.
    uploads = [(f.filename or "", f.read()) for f in files]
    uploads = [(name, data) for name, data in uploads if name or data]
    if not uploads:
        raise BadRequest(f"No file was uploaded in the form field {UPLOAD_FIELD!r}.",
                         fields={UPLOAD_FIELD: "one or more image files"})
    records = []
    for position, (name, data) in enumerate(uploads, start=1):
        try:
            ingested = ingest_image(data, name)
        except ConvscopeError as error:
            error.fields.setdefault(UPLOAD_FIELD, f"file {position} of {len(uploads)}")
            raise
        records.append(images.put(ingested))
    return records
