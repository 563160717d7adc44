"""Ray job entrypoint: run a merge recipe on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/merge.py RECIPE \
        [--workers 4] [--block-size 512MiB] [--resume]

Same flags as `distmerge merge` (they are the same command). A failing merge exits non-zero, so the Ray job
is marked FAILED with the error in its logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job's working dir holds the repository; make the package importable even where it isn't installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distmerge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["merge", *sys.argv[1:]])
