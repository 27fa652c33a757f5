"""``convscope check [DIR] [--json] [--trust-code] [--device D]``: load every checkpoint, report.

Exit status: 0 when every checkpoint loaded, 1 when any failed (or there were none),
2 when the directory or device cannot be used at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from app.catalog import CatalogEntry, ModelCatalog, demo_directory
from app.devices import configure_threads, resolve_device
from app.errors import ConvscopeError
from model_adapters.checkpoint_file import CHECKPOINT_SUFFIXES

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def check_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    directory = Path(args.directory) if args.directory else demo_directory()
    as_json = bool(getattr(args, "json", False))
    if not directory.is_dir():
        return _fail(out, as_json, directory, "E_NOT_FOUND",
                     "The checkpoint directory does not exist or is not a directory.")
    try:
        configure_threads()
        device = resolve_device(args.device)
    except ConvscopeError as error:
        return _fail(out, as_json, directory, error.code, error.message)
    catalog = ModelCatalog(directory, device, trust_code=args.trust_code, settle_seconds=0.0)
    # A fresh catalog scans (loading every checkpoint) on its first entries() call.
    entries = sorted(catalog.entries(), key=lambda entry: entry.file)
    rows = [checkpoint_record(entry) for entry in entries]
    if as_json:
        json.dump({"directory": str(directory), "checkpoints": rows}, out)
        out.write("\n")
    else:
        _print_table(out, directory, rows)
    return EXIT_OK if rows and all(row["ok"] for row in rows) else EXIT_FAILED


def checkpoint_record(entry: CatalogEntry) -> dict[str, Any]:
    """One checkpoint as in ``convscope check --json``: the API's model record without its
    opaque id and mtime, plus what a check reports besides."""
    record = entry.to_dict()
    del record["id"], record["modified"]
    meta = entry.meta
    record.update(cam_layer=meta.default_cam_layer if meta else None,
                  parameters=meta.parameters if meta else None, sha256=entry.sha256)
    return record


def _print_table(out: TextIO, directory: Path, rows: list[dict[str, Any]]) -> None:
    out.write(f"Checkpoints in {directory}\n")
    if not rows:
        out.write(f"No checkpoint files found ({' '.join(CHECKPOINT_SUFFIXES)}).\n")
        return
    header = ("FILE", "STATUS", "ARCHITECTURE", "CLASSES", "INPUT", "CAM LAYER", "PARAMS")
    table = [header]
    for row in rows:
        if row["ok"]:
            channels, height, width = row["input_size"]
            table.append((row["file"], "ok, latest" if row["latest"] else "ok",
                          row["architecture"], str(row["num_classes"]),
                          f"{channels}x{height}x{width}", row["cam_layer"] or "-",
                          _human_count(row["parameters"])))
        else:
            table.append((row["file"], row["error"]["code"], "-", "-", "-", "-", "-"))
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                  + "\n")
    failed = [row for row in rows if not row["ok"]]
    for row in failed:
        out.write(f"{row['file']}: {row['error']['code']}: {row['error']['message']}\n")
    loaded = len(rows) - len(failed)
    out.write(f"{loaded} of {len(rows)} checkpoints loaded.\n")


def _human_count(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _fail(out: TextIO, as_json: bool, directory: Path, code: str, message: str) -> int:
    if as_json:
        json.dump({"directory": str(directory), "checkpoints": [],
                   "error": {"code": code, "message": message}}, out)
        out.write("\n")
    else:
        sys.stderr.write(f"convscope check: {code}: {message}\n")
    return EXIT_UNUSABLE
