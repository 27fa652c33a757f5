"""The ``convscope`` console script: ``serve``, ``worker``, ``check``, ``visualize``,
``evaluate``, ``timeline`` and ``sanity``.

This module only parses arguments and dispatches; each command lives in its own module.
No DIR means the bundled demo.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", nargs="?", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bundled demo)")
    parser.add_argument("--device", default=os.environ.get("CONVSCOPE_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N (env CONVSCOPE_DEVICE; default auto)")
    parser.add_argument("--trust-code", action="store_true",
                        default=_env_flag("CONVSCOPE_TRUST_CODE"),
                        help="allow checkpoints that execute code when loaded: full pickles, "
                             "TorchScript, torch.export archives, .py files "
                             "(env CONVSCOPE_TRUST_CODE=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convscope",
                                     description="See what an image classifier looks at.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the web server")
    _add_model_options(serve)
    serve.add_argument("--host", default=os.environ.get("CONVSCOPE_HOST", "127.0.0.1"),
                       help="address to bind (default 127.0.0.1; others only when asked)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("CONVSCOPE_PORT", "8000")))
    serve.add_argument("--data-dir", default=None,
                       help="where results are stored (env CONVSCOPE_DATA_DIR)")
    serve.add_argument("--datasets", default=None, metavar="ROOT",
                       help="folder whose subfolders are labelled datasets to evaluate "
                            "(env CONVSCOPE_DATASET_DIR)")

    check = commands.add_parser("check", help="load every checkpoint in DIR and report")
    _add_model_options(check)
    check.add_argument("--json", action="store_true", help="print one JSON object")

    visualize = commands.add_parser("visualize", help="write a static HTML report")
    visualize.add_argument("paths", nargs="+", metavar="[DIR] IMAGE",
                           help="optional checkpoint directory, then one or more images")
    visualize.add_argument("--device", default=os.environ.get("CONVSCOPE_DEVICE", "auto"))
    visualize.add_argument("--trust-code", action="store_true",
                           default=_env_flag("CONVSCOPE_TRUST_CODE"))
    visualize.add_argument("--method", action="append", required=True, dest="methods",
                           metavar="NAME", help="visualization to run (repeatable)")
    visualize.add_argument("--param", action="append", default=[], dest="params",
                           metavar="NAME.KEY=VALUE", help="a method parameter (repeatable)")
    visualize.add_argument("--checkpoint", default=None, metavar="FILE",
                           help="checkpoint file in DIR (default: latest)")
    visualize.add_argument("--target", action="append", default=None, dest="targets",
                           metavar="predicted|INDEX|LABEL", help="target class (repeatable)")
    visualize.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    visualize.add_argument("--json", action="store_true", help="print results.json to stdout")
    visualize.add_argument("--no-faithfulness", action="store_false", dest="faithfulness",
                           default=os.environ.get("CONVSCOPE_FAITHFULNESS", "1").strip().lower()
                           not in ("0", "false", "no", "off"),
                           help="skip the deletion/insertion faithfulness scores (66 forward "
                                "passes per panel; env CONVSCOPE_FAITHFULNESS=0)")

    evaluate = commands.add_parser("evaluate", help="evaluate a labelled dataset folder and "
                                                    "report its failure cases")
    evaluate.add_argument("--device", default=os.environ.get("CONVSCOPE_DEVICE", "auto"))
    evaluate.add_argument("--trust-code", action="store_true",
                          default=_env_flag("CONVSCOPE_TRUST_CODE"))
    evaluate.add_argument("paths", nargs="+", metavar="[DIR] DATASET",
                          help="optional checkpoint directory, then the labelled dataset folder")
    evaluate.add_argument("--checkpoint", default=None, metavar="FILE",
                          help="checkpoint file in DIR (default: latest)")
    evaluate.add_argument("--top-k", type=int, default=5, dest="top_k", metavar="K",
                          help="predictions kept per image (default 5)")
    evaluate.add_argument("--explain", type=int, default=0, metavar="N",
                          help="visualize the N most confident failures, for their predicted "
                               "and their true class")
    evaluate.add_argument("--method", action="append", default=None, dest="methods",
                          metavar="NAME", help="method for --explain (repeatable; default "
                                               "grad_cam)")
    evaluate.add_argument("--param", action="append", default=[], dest="params",
                          metavar="NAME.KEY=VALUE", help="a method parameter (repeatable)")
    evaluate.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    evaluate.add_argument("--json", action="store_true", help="print evaluation.json to stdout")

    timeline = commands.add_parser("timeline", help="the same images (and a dataset) across a "
                                                    "training run's checkpoints")
    timeline.add_argument("paths", nargs="+", metavar="[DIR] IMAGE",
                          help="optional checkpoint directory, then one or more images")
    timeline.add_argument("--device", default=os.environ.get("CONVSCOPE_DEVICE", "auto"))
    timeline.add_argument("--trust-code", action="store_true",
                          default=_env_flag("CONVSCOPE_TRUST_CODE"))
    timeline.add_argument("--method", action="append", default=None, dest="methods",
                          metavar="NAME", help="visualization to run per checkpoint "
                                               "(repeatable; none: predictions only)")
    timeline.add_argument("--param", action="append", default=[], dest="params",
                          metavar="NAME.KEY=VALUE", help="a method parameter (repeatable)")
    timeline.add_argument("--target", action="append", default=None, dest="targets",
                          metavar="predicted|INDEX|LABEL",
                          help="class to explain (repeatable; default: each image's predicted "
                               "class at the last checkpoint)")
    timeline.add_argument("--dataset", default=None, metavar="DATASET",
                          help="labelled dataset folder: accuracy per checkpoint and flips")
    timeline.add_argument("--every", type=int, default=1, metavar="K",
                          help="every K-th checkpoint (the first and the last always)")
    timeline.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    timeline.add_argument("--json", action="store_true", help="print timeline.json to stdout")

    worker = commands.add_parser("worker", help="run jobs from Redis (CONVSCOPE_BROKER_URL) "
                                                "on one device, as a Celery worker")
    _add_model_options(worker)
    worker.add_argument("--data-dir", default=None,
                        help="the data directory the web processes share (env "
                             "CONVSCOPE_DATA_DIR)")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="jobs at once (default 1: the solo pool, one job per device; more "
                             "run as threads on the same device)")
    worker.add_argument("--loglevel", default="INFO", help="Celery's log level (default INFO)")

    from app.sanity_cli import add_parser as add_sanity_parser

    sanity = add_sanity_parser(commands)
    sanity.add_argument("--device", default=os.environ.get("CONVSCOPE_DEVICE", "auto"))
    sanity.add_argument("--trust-code", action="store_true",
                        default=_env_flag("CONVSCOPE_TRUST_CODE"))
    return parser


def _version() -> str:
    from app.version import __version__

    return f"convscope {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from app.serve import serve_command

        return serve_command(args)
    if args.command == "worker":
        from app.worker import worker_command

        return worker_command(args)
    if args.command == "check":
        from app.check import check_command

        return check_command(args)
    if args.command == "evaluate":
        from app.evaluate_cli import evaluate_command

        return evaluate_command(args)
    if args.command == "timeline":
        from app.timeline_cli import timeline_command

        return timeline_command(args)

    if args.command == "sanity":
        from app.sanity_cli import sanity_command

        return sanity_command(args)
    from app.report import visualize_command

    return visualize_command(args)


if __name__ == "__main__":
    sys.exit(main())
