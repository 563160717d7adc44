"""Bounded memory: a merge's peak RSS grows far less than its inputs.

Merges run in a fresh subprocess on two synthetic Qwen2 models with the same tensor shapes (so the largest
tensor is the same) and 4x as many layers (~110 MB vs ~410 MB of inputs across base + 2 models). The child
reports its peak RSS. With a small block size the peak must grow by well under 25% of the added input bytes.
Local inputs are mapped and each piece's pages are released once merged; with releasing switched off the
peak must grow by a large part of the inputs, which proves the measurement can see memory at all.

The peak is read from VmHWM in /proc/self/status, not ru_maxrss: on Linux a child's ru_maxrss starts at the
RSS its parent had when it forked (the high-water mark of the pre-exec memory image is carried over), so with
a pytest parent of several hundred MB, ru_maxrss would report the parent, not the merge. The child loads the
fused CPU kernels (a small C library) before its baseline, with the other code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distmerge import merge_core
from tests.conftest import build_tiny_model

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, shard="32MB")
LAYERS = {"small": 4, "large": 16}
SMALL_BLOCK = 4 * 1024**2  # the largest tensor (MLP, 512 x 1024 fp32) is 2 MiB

CHILD = """
import json, resource, sys
from distmerge import merge_core
from distmerge.merge import run_merge
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe
from distmerge.methods import cpu_kernels

cpu_kernels.warm_up()  # code, like the imports: not the merge's working set

def peak_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

specs, block, read_chunk = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
merge_core.READ_CHUNK_BYTES = read_chunk
if sys.argv[4] == "keep-mapped":  # the sensitivity check: mapped input pages never released
    from distmerge.reader import TensorReader
    TensorReader.release = lambda self, *args: None
before = peak_kib()
for spec in specs:
    run_merge(parse_recipe(spec), RunOptions(workers=0, progress=False, block_size=block, device="cpu"))
print(json.dumps({"imports_kib": before, "peak_kib": peak_kib()}))
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    roots = {}
    for size, layers in LAYERS.items():
        root = tmp_path_factory.mktemp(size)
        for seed, name in enumerate(("base", "a", "b")):
            build_tiny_model(root / name, "qwen2", seed=seed, num_hidden_layers=layers, **SHAPE)
        roots[size] = root
    return roots


def input_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.safetensors"))


def peak_rss(root: Path, out: Path, block_size: int, methods=("task_arithmetic", "ram_plus"),
             read_chunk: int = merge_core.READ_CHUNK_BYTES, release: bool = True) -> dict:
    """Merge `root`'s base, a, b with each method in one fresh process; its import and peak RSS (bytes)."""
    specs = [{"base": str(root / "base"), "models": [{"name": n, "path": str(root / n)} for n in ("a", "b")],
              "method": method, "output": str(out / method)} for method in methods]
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(specs), str(block_size), str(read_chunk),
                             "release" if release else "keep-mapped"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {k.removesuffix("_kib"): v * 1024 for k, v in report.items()}


def test_peak_memory_grows_far_less_than_the_model(models, tmp_path):
    small = peak_rss(models["small"], tmp_path / "small", SMALL_BLOCK)
    large = peak_rss(models["large"], tmp_path / "large", SMALL_BLOCK)
    added_inputs = input_bytes(models["large"]) - input_bytes(models["small"])
    assert added_inputs > 250 * 1024**2  # the effect below is measurable
    growth = large["peak"] - small["peak"]
    assert growth < 0.25 * added_inputs, (
        f"peak RSS grew {growth / 2**20:.0f} MiB for {added_inputs / 2**20:.0f} MiB more inputs "
        f"(small {small['peak'] / 2**20:.0f} MiB, large {large['peak'] / 2**20:.0f} MiB)")
    # The merge's working set above the imports stays a few blocks, not a model.
    assert large["peak"] - large["imports"] < 40 * SMALL_BLOCK, large  # ~90 MiB measured


def test_unreleased_mapped_inputs_show_up_in_the_peak(models, tmp_path):
    """Sensitivity check: local inputs are mapped, so a merge that never released their pages would hold every
    input's bytes by its end; the measurement sees that."""
    released = peak_rss(models["large"], tmp_path / "released", SMALL_BLOCK, methods=("task_arithmetic",))
    kept = peak_rss(models["large"], tmp_path / "kept", SMALL_BLOCK, methods=("task_arithmetic",), release=False)
    assert kept["peak"] - released["peak"] > 0.4 * input_bytes(models["large"]), (released, kept)
