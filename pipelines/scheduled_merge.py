"""Ray job entrypoint: the merge scheduler for a pipeline spec (`distmerge watch` as a job).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/scheduled_merge.py pipelines/specs/scheduled.yaml [--once] [--workers 2]

Each tick fingerprints the spec's sources and runs merge -> evaluate -> gate -> publish only for inputs not
yet decided; a lease in the bucket keeps two schedulers from running the same merge. Without --once it ticks
on the spec's schedule until stopped. With --once the exit status is 1 when the tick's run failed or its gates
failed (the reason is logged), 2 for a bad spec, else 0 (including "nothing new").
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

# The job's working dir holds the repository; make the package importable even where it isn't installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("scheduled_merge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="Pipeline spec (YAML) with a schedule, local path or URL.")
    parser.add_argument("--once", action="store_true", help="Run one tick and exit.")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, set in Ray jobs).")
    parser.add_argument("--workers", type=int, default=None, help="Merge worker actors (overrides run.workers).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `ray job stop` and pod shutdown send SIGTERM: exit through finally blocks (lease released, actors stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from distmerge.errors import DistmergeError
    from distmerge.production import Runtime, Scheduler, load_spec

    try:
        spec = load_spec(args.spec)
        with Runtime(spec, address=args.address, workers=args.workers) as runtime:
            result = Scheduler(spec, runtime).watch(once=args.once)
    except DistmergeError as exc:
        log.error("%s", exc)
        return 2
    (log.error if result.exit_code else log.info)("%s: %s", result.action, result.reason)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
