"""The end-to-end demo behind `make demo`: everything distmerge can do, on embedded defaults.

Today: build a small real checkpoint locally (transformers Qwen2, random weights), index it from headers,
round-trip it through the sharded writer with an atomic commit, and check that transformers loads the
result tensor for tensor. Each stage prints what it did and how long it took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click


def _stage(title: str, fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    detail = fn()
    click.echo(f"[{time.perf_counter() - start:6.1f}s] {title}: {detail}")


def build_small_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small random Qwen2 (untied embeddings), saved sharded in float32."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(path), safe_serialization=True, max_shard_size="1MB")
    return path


def round_trip(source: str, dest: str, max_shard_bytes: int) -> tuple[int, int]:
    """Read every tensor of `source` and write it to `dest` through the staged writer."""
    from distmerge.checkpoint import CheckpointIndex
    from distmerge.reader import TensorReader
    from distmerge.writer import CheckpointWriter, pack_shards, shard_file_name

    index = CheckpointIndex.load(source)
    writer = CheckpointWriter(dest, overwrite=True, protected=[source])
    groups = pack_shards([(n, index.tensors[n].nbytes) for n in index.names], max_shard_bytes)
    records = []
    with TensorReader(index) as reader:
        for i, group in enumerate(groups):
            tensors = reader.read(group)
            records.append(writer.write_shard(shard_file_name(i, len(groups)), list(tensors.items())))
    writer.commit(records, writer.stage_aux_from(source))
    return len(records), index.num_parameters


def check_loads_equal(source: str, dest: str) -> int:
    import torch
    import transformers

    from distmerge.reader import read_tensors

    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    state = model.state_dict()
    expected = read_tensors(source)
    mismatched = [n for n, t in expected.items() if not torch.equal(state[n], t)]
    if mismatched:
        raise RuntimeError(f"round-trip changed tensors: {mismatched[:5]}")
    return len(expected)


def run_demo(out: Path) -> None:
    from distmerge.checkpoint import CheckpointIndex
    from distmerge.cli.inspect_cmd import format_summary

    out.mkdir(parents=True, exist_ok=True)
    source = out / "models" / "small-qwen2"
    dest = out / "roundtrip"
    _stage("build a small Qwen2 checkpoint", lambda: str(build_small_checkpoint(source)))
    summary = CheckpointIndex.load(str(source)).summary()
    _stage("inspect it from headers only", lambda: f"{summary['num_parameters']:,} parameters")
    click.echo(format_summary(summary))
    _stage("round-trip through the staged writer",
           lambda: "{} shards, {:,} parameters".format(*round_trip(str(source), str(dest), 256 * 1024)))
    _stage("load the result with transformers", lambda: f"{check_loads_equal(str(source), str(dest))} tensors equal")
    (out / "demo.json").write_text(json.dumps({"source": summary, "roundtrip": str(dest)}, indent=2))
    click.echo(f"demo finished; outputs in {out}")
