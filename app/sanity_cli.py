"""``convscope sanity [DIR] IMAGE... --method NAME``: does a method's map depend on the model?

Runs without a server: loads one checkpoint (the directory's latest, or ``--checkpoint``; no DIR
means the bundled demo), reads the images through the hardened ingest and runs
``visualizations.sanity.sanity_check`` -- the engine the server's sanity jobs use: the model's
layers are re-initialized cumulatively from the output back to the input (Adebayo et al. 2018,
seeded), the map is recomputed after each step for every image (always for the trained model's
predicted class) and compared with the trained model's map.

``--json`` prints exactly one object on stdout::

    {"method", "checkpoint", "params", "images": n,
     "steps": [{"randomized", "spearman", "ssim"}, ...],   # from the top layer down
     "passed", "threshold"}

``passed``: the last step's (everything randomized) median Spearman rank correlation of |map|
with the original is below ``threshold``. Without ``--json``, a table of the steps and the
verdict. ``--param KEY=VALUE`` (or ``METHOD.KEY=VALUE``) sets a method parameter.

Exit status 0 whenever the check ran, passed or failed; 2 with ``CODE: message`` on stderr (and,
with ``--json``, ``{"error": {"code", "message", ...}}`` on stdout) for what a user got wrong (a method, a parameter, an image, a checkpoint, E_TOO_EXPENSIVE over
``CONVSCOPE_MAX_COST``), checked before any map is computed; 1 when a run fails later.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from app.errors import BadParameter, ConvscopeError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRESS_EVERY_S = 5.0
_USAGE_CODES = {"E_BAD_PARAMETER", "E_BAD_REQUEST", "E_UNKNOWN_VISUALIZATION", "E_UNKNOWN_MODEL",
                "E_NOT_FOUND", "E_METHOD_UNSUPPORTED", "E_DEVICE_UNAVAILABLE",
                "E_CHECKPOINT_NEEDS_TRUST", "E_TOO_EXPENSIVE", "E_CONFIG_INVALID"}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``sanity`` subcommand and its own arguments (``app.cli.build_parser`` adds
    ``--device`` and ``--trust-code`` as for ``visualize``)."""
    sanity = commands.add_parser(
        "sanity", help="check that a method's map changes when the model's weights are "
                       "randomized (Adebayo et al. 2018)")
    sanity.add_argument("paths", nargs="+", metavar="[DIR] IMAGE",
                        help="optional checkpoint directory, then one or more images")
    sanity.add_argument("--method", required=True, metavar="NAME", help="visualization to check")
    sanity.add_argument("--param", action="append", default=[], dest="params",
                        metavar="KEY=VALUE", help="a method parameter (repeatable)")
    sanity.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="checkpoint file in DIR (default: latest)")
    sanity.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return sanity


def sanity_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point used by ``app.cli``; returns the process exit status."""
    out = out or sys.stdout
    try:
        result = run_check(args)
    except ConvscopeError as error:
        usage = error.code in _USAGE_CODES or error.code.startswith("E_IMAGE_")
        if args.json:       # as visualize and evaluate do: stdout stays one JSON object
            json.dump({"error": error.to_dict()}, out)
            out.write("\n")
        sys.stderr.write(f"convscope sanity: {error.code}: {error.message}\n")
        return EXIT_USAGE if usage else EXIT_FAILED
    document = result.to_dict()
    if args.json:
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(document))
    return EXIT_OK


def parse_params(options: Sequence[str], method: str) -> dict[str, str]:
    """``["steps=64", "integrated_gradients.steps=64"]`` -> ``{"steps": "64"}``."""
    raw: dict[str, str] = {}
    for option in options:
        match = re.fullmatch(r"\s*(?:([A-Za-z0-9_]+)\.)?([A-Za-z0-9_]+)\s*=(.*)", option)
        if match is None:
            raise BadParameter(f"--param {option[:80]!r} must look like KEY=VALUE, e.g. "
                               "window=16.", fields={"param": "KEY=VALUE"})
        prefix, key, value = match.groups()
        if prefix is not None and prefix != method:
            raise BadParameter(f"--param {option[:80]!r} is for method {prefix!r}, not "
                               f"{method!r}.", fields={"param": prefix})
        raw[key] = value.strip()
    return raw


def run_check(args: argparse.Namespace) -> Any:
    """Validate everything, then run the check; returns the ``SanityResult``."""
    from app.devices import configure_threads, resolve_device
    from app.report import open_model, read_image, split_paths
    from app.sanity import check_cost, max_cost_from_env, sanity_request
    from visualizations import visualization_registry
    from visualizations.context import RunContext
    from visualizations.randomization import randomization_steps
    from visualizations.sanity import sanity_check

    directory, image_paths = split_paths(args.paths)
    visualization = visualization_registry.get(args.method)
    raw_params = parse_params(args.params, visualization.name)
    limit = max_cost_from_env()
    configure_threads()
    device = resolve_device(args.device)
    images = [read_image(path) for path in image_paths]
    model = open_model(directory, args.checkpoint, device, args.trust_code)
    request = sanity_request(visualization, raw_params, model.meta)
    batches = [model.to_tensor([model.model_view(image)]) for image in images]
    steps = len(randomization_steps(model.module, batches[0]))
    cost = check_cost(visualization, request, model.meta, len(batches), limit, steps)
    log.info("sanity check of %s on %s: %d images, %d steps, up to %d model evaluations",
             visualization.name, model.meta.checkpoint_file, len(batches), steps, cost)
    progress = _ProgressLog()
    params = visualization.parse_params(request.params, model.meta)
    return sanity_check(model, batches, visualization, params, RunContext(progress=progress))


class _ProgressLog:
    """Logs the check's progress (stderr) every few seconds."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("sanity check %.0f %% done (%.0f s)", 100 * fraction, now - self.started)


def format_table(document: dict[str, Any]) -> str:
    """The result as a readable table: one row per randomization step, then the verdict."""
    steps = document["steps"]
    width = max([len("randomized (cumulative, top down)")]
                + [len(step["randomized"]) for step in steps])
    params = ", ".join(f"{key}={value}" for key, value in sorted(document["params"].items()))
    lines = [f"Sanity check of {document['method']} ({params or 'no parameters'}) on "
             f"{Path(document['checkpoint']).name}, {document['images']} image"
             f"{'s' if document['images'] != 1 else ''}:", "",
             f"  {'step':>4}  {'randomized (cumulative, top down)':<{width}}  {'spearman':>8}  "
             f"{'ssim':>6}"]
    for number, step in enumerate(steps, 1):
        lines.append(f"  {number:>4}  {step['randomized']:<{width}}  {step['spearman']:>8.3f}  "
                     f"{step['ssim']:>6.3f}")
    final = steps[-1]["spearman"]
    verdict = ("PASSED: the map changes once the model is random" if document["passed"] else
               "FAILED: the map still resembles the trained model's once every weight is random")
    lines += ["", f"{verdict} (final Spearman {final:.3f}, threshold < "
                  f"{document['threshold']:.2f})."]
    return "\n".join(lines) + "\n"
