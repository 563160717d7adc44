"""mergekit, the reference: installed by the benchmark in its own venv, configured per method, and its
outputs compared with distmerge's.

The venv (<cache>/mergekit-venv) gets the CPU torch wheel the machine's pip offers first, then a pinned
mergekit, so mergekit's plain `torch>=2` requirement does not pull CUDA packages; a stamp file records what
was installed, and a rerun reuses it. mergekit computes in float32 by default here (`--mergekit-dtype`):
distmerge always computes in fp32.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from merge_bench.family import Family
from merge_bench.log import log
from merge_bench.specs import MethodSpec

MERGEKIT_SPEC = "mergekit==0.1.5"  # installs cleanly on top of torch==2.13.0 (CPU wheel)
TORCH_SPEC = "torch==2.13.0"


def ensure_mergekit(cache: Path, spec: str = MERGEKIT_SPEC) -> Path:
    """The mergekit-yaml executable, installing the venv once."""
    venv = cache / "mergekit-venv"
    stamp = venv / ".bench-installed"
    wanted = f"{TORCH_SPEC} {spec}"
    exe = venv / "bin" / "mergekit-yaml"
    if stamp.exists() and stamp.read_text().strip() == wanted and exe.exists():
        return exe
    log(f"installing {wanted} into {venv} (once)")
    if not (venv / "bin" / "python").exists():
        subprocess.run([getattr(sys, "_base_executable", None) or sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_SPEC], check=True)
    subprocess.run([*pip, spec], check=True)
    stamp.write_text(wanted + "\n")
    log(f"mergekit venv ready: {mergekit_version(exe)}")
    return exe


def mergekit_version(exe: Path) -> str:
    python = exe.parent / "python"
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True).stdout.strip()


def mergekit_command(exe: Path, spec: MethodSpec, family: Family, out: Path, config: Path, dtype: str,
                     shard_mib: int) -> list[str]:
    import yaml

    models = []
    for role in family.models:
        entry = {"model": str(family.dirs[role])}
        if spec.mk_model_params:
            entry["parameters"] = dict(spec.mk_model_params)
        models.append(entry)
    document = {"merge_method": spec.mk_method, "models": models, "dtype": dtype, "out_dtype": "bfloat16"}
    if spec.mk_base:
        document["base_model"] = str(family.dirs["base"])
    if spec.mk_params:
        document["parameters"] = dict(spec.mk_params)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    shard_params = str(shard_mib * 2**20 // 2)  # bf16 output: 2 bytes a parameter
    return [str(exe), str(config), str(out), "--lazy-unpickle", "--out-shard-size", shard_params,
            "--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0", "--quiet", "--allow-crimes"]


def _locations(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out.update(dict.fromkeys(fh.keys(), path))
    return out


def compare_outputs(dm_dir: Path, mk_dir: Path, base_dir: Path) -> dict:
    """Per entry of the bf16 outputs: max |distmerge - mergekit|, the fraction of equal entries, and the
    largest merged delta |merged - base| for scale; the most differing tensors."""
    from safetensors import safe_open

    dm, mk, base = _locations(dm_dir), _locations(mk_dir), _locations(base_dir)
    max_abs = max_delta = 0.0
    equal = total = 0
    worst, per_tensor = "", []
    for name in sorted(set(dm) & set(mk)):
        tensors = []
        for where in (dm, mk, base):
            with safe_open(str(where[name]), framework="pt") as fh:
                tensors.append(fh.get_tensor(name).float())
        ours, theirs, theta0 = tensors
        diff = (ours - theirs).abs()
        max_delta = max(max_delta, float((ours - theta0).abs().max()))
        same = int((diff == 0).sum())
        equal += same
        total += diff.numel()
        if same < diff.numel():
            per_tensor.append((1 - same / diff.numel(), name, float(diff.max())))
        if float(diff.max()) > max_abs:
            max_abs, worst = float(diff.max()), name
    per_tensor.sort(reverse=True)
    return {"max_abs_diff": max_abs, "equal_fraction": equal / max(total, 1), "differing_entries": total - equal,
            "entries": total, "max_abs_merged_delta": max_delta,
            "worst_tensor": worst, "tensors_compared": len(set(dm) & set(mk)), "tensors_differing": len(per_tensor),
            "most_differing": [{"tensor": n, "differing_fraction": round(f, 6), "max_abs_diff": d}
                               for f, n, d in per_tensor[:3]],
            "only_distmerge": sorted(set(dm) - set(mk)), "only_mergekit": sorted(set(mk) - set(dm))}
