"""Ray job entrypoint: merge -> evaluate -> gate -> publish, once, for the pipeline spec given.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/merge_eval_publish.py pipelines/specs/merge_eval_publish.yaml [--workers 2] [--dry-run]

The merged model goes to <publish.root>/runs/<run-id>/model and its evaluation to .../eval; <publish.root>/latest.json
moves to it only when every gate passes. Every run appends a row to the ledger. Exit status: 0 published (or
merged with publish.promote false, or --dry-run), 1 gate failed or the run failed (the reason is logged, so the Ray
job is marked FAILED with it), 2 bad spec or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

# The job's working dir holds the repository; make the package importable even where it isn't installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("merge_eval_publish")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="Pipeline spec (YAML), local path or URL.")
    parser.add_argument("--workers", type=int, default=None, help="Merge worker actors (overrides run.workers).")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, set in Ray jobs).")
    parser.add_argument("--dry-run", action="store_true", help="Resolve the sources, fingerprint and plan from "
                        "headers; print what would run, write nothing.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `ray job stop` and pod shutdown send SIGTERM: exit through finally blocks (lease released, actors stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from distmerge.errors import DistmergeError
    from distmerge.production import Runtime, load_spec, run_once
    from distmerge.production.pipeline import describe_run

    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            print(json.dumps(describe_run(spec, workers=args.workers), indent=2))
            return 0
        with Runtime(spec, address=args.address, workers=args.workers) as runtime:
            result = run_once(spec, runtime)
    except DistmergeError as exc:
        log.error("%s", exc)
        return 2
    if result.status in ("published", "merged"):
        log.info("%s", result.describe())
        return 0
    log.error("%s", result.describe())
    return 1


if __name__ == "__main__":
    sys.exit(main())
