"""Evaluation pieces that need no vLLM: suites and scoring, roles and gates, report files, engine settings,
remote checkpoint caching, CLI input errors."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from distmerge.cli.eval_cmd import eval_cmd
from distmerge.evaluation import (
    EvalOptions,
    EvalReport,
    Roles,
    check_gates,
    parse_suite,
    resolve_roles,
    write_report,
)
from distmerge.evaluation.engine import local_checkpoint
from distmerge.evaluation.gates import GateError, parse_gate
from distmerge.evaluation.options import engine_settings
from distmerge.evaluation.runner import _units
from distmerge.evaluation.suites import Example, SuiteError
from distmerge.storage import Location
from distmerge.testbed import tasks as testbed_tasks

ROWS = [
    {"prompt": "Q: 2+2?", "answer": "4"},
    {"prompt": "Q: 10*100?", "answer": "1,000", "task": "math"},
    {"prompt": "Q: name?", "answer": "Ada", "regex": r"name is (\w+)"},
]


def write_jsonl(path, rows=ROWS) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_testbed_suite_matches_the_task_registry():
    suite = parse_suite("testbed:reversal,uppercase", n_per_task=5, seed=2)
    expected = testbed_tasks.suite(["reversal", "uppercase"], 5, 2)
    assert suite.tasks == ["reversal", "uppercase"] and suite.max_tokens == 12
    assert [(e.task, e.prompt, e.answer) for e in suite.examples] == [
        (task, e["prompt"], e["answer"]) for task, items in expected.items() for e in items]
    assert parse_suite("testbed", n_per_task=2).tasks == ["addition", "reversal", "sorting", "uppercase"]
    assert parse_suite("testbed:sorting", n_per_task=2, max_tokens=5).max_tokens == 5
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_suite("testbed:nope")
    # The testbed rule: text up to EOS/newline, stripped, exact.
    example = suite.examples[0]
    assert suite.is_correct(example, suite.predict(example, f" {example.answer}\nmore"))
    assert not suite.is_correct(example, suite.predict(example, example.answer.upper() + "x"))


def test_user_suite_jsonl_and_parquet(tmp_path):
    import pyarrow as pa

    jsonl = write_jsonl(tmp_path / "qa.jsonl")
    suite = parse_suite(f"qa={jsonl}", regexes={"qa": r"answer: (\S+)"})
    assert suite.name == "qa" and suite.tasks == ["qa", "math"] and suite.max_tokens == 256
    plain, numeric, named = suite.examples
    assert suite.is_correct(plain, suite.predict(plain, "so the answer: 4 ok"))
    assert suite.is_correct(numeric, suite.predict(numeric, "answer: 1000."))  # numbers compare by value
    assert suite.predict(named, "my name is Ada, answer: x") == "Ada"  # the row's regex wins
    assert suite.predict(plain, "no match here") == "" and not suite.is_correct(plain, "")
    bare = parse_suite(jsonl, limit=2)  # named after the file, first rows only, first line without a regex
    assert bare.name == "qa" and len(bare.examples) == 2 and bare.predict(plain, " 4 \nnext") == "4"
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS]), parquet)
    from_parquet = parse_suite(str(parquet))
    assert [e.prompt for e in from_parquet.examples] == [r["prompt"] for r in ROWS]


def test_user_suite_errors_name_the_problem(tmp_path):
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "x"}])
    with pytest.raises(SuiteError, match="row 1 of .*broken.jsonl has no answer"):
        parse_suite(broken)
    with pytest.raises(SuiteError, match="does not compile"):
        parse_suite(f"qa={write_jsonl(tmp_path / 'qa.jsonl')}", regexes={"qa": "(unclosed"})
    (tmp_path / "data.csv").write_text("prompt,answer\n")
    with pytest.raises(SuiteError, match="jsonl or \\*.parquet"):
        parse_suite(str(tmp_path / "data.csv"))


def test_user_suite_from_s3(s3_bucket, tmp_path):
    url, options = s3_bucket
    Location(f"{url}/suites/qa.jsonl", options).write_bytes(open(write_jsonl(tmp_path / "qa.jsonl"), "rb").read())
    suite = parse_suite(f"{url}/suites/qa.jsonl", storage_options=options)
    assert suite.name == "qa" and [e.answer for e in suite.examples] == ["4", "1,000", "Ada"]


ACCURACY = {"base": {"addition": 0.1, "reversal": 0.2}, "sft-addition": {"addition": 0.8, "reversal": 0.1},
            "sft-reversal": {"addition": 0.0, "reversal": 1.0}, "ties": {"addition": 0.75, "reversal": 0.85}}


def test_roles_follow_names_and_explicit_choices():
    roles = resolve_roles(list(ACCURACY), ["addition", "reversal"])
    assert roles == Roles(base="base", inputs=["sft-addition", "sft-reversal"],
                          specialists={"addition": "sft-addition", "reversal": "sft-reversal"})
    assert roles.candidates(ACCURACY) == ["ties"]
    explicit = resolve_roles(list(ACCURACY), ["addition"], base="sft-reversal", specialists={"addition": "ties"})
    assert explicit.base == "sft-reversal" and explicit.specialists == {"addition": "ties"}
    assert explicit.candidates(ACCURACY) == ["base", "sft-addition"]
    with pytest.raises(GateError, match="'missing', which is not evaluated"):
        resolve_roles(list(ACCURACY), ["addition"], inputs=["missing"])


def test_gates_pass_and_fail_with_both_scores_and_the_threshold():
    roles = resolve_roles(list(ACCURACY), ["addition", "reversal"])
    checks = check_gates(["merged>=0.9*specialist", "merged>=base"], ACCURACY, roles)
    by_task = {(c.gate, c.task): c for c in checks}
    assert by_task[("merged>=0.9*specialist", "addition")].passed  # 0.75 >= 0.72
    failed = by_task[("merged>=0.9*specialist", "reversal")]  # 0.85 < 0.9
    assert not failed.passed and failed.threshold == pytest.approx(0.9)
    assert failed.describe() == ("gate 'merged>=0.9*specialist' FAILED on task reversal: ties scores 0.850 < "
                                 "threshold 0.900 (= 0.9 x sft-reversal 1.000)")
    assert all(c.passed for c in checks if c.gate == "merged>=base")
    assert parse_gate(" ties >= sft-addition ").factor == 1.0
    exact = check_gates(["ties>=sft-addition"], {"ties": {"a": 0.3}, "sft-addition": {"a": 0.1 + 0.2}}, Roles())
    assert exact[0].passed  # float noise does not fail a tie
    for bad, message in [("merged > base", "cannot parse"), ("nobody>=base", "no model plays 'nobody'"),
                         ("merged>=specialist", "no evaluated task has one")]:
        with pytest.raises(GateError, match=message):
            check_gates([bad], ACCURACY, Roles(base="base"))


def synthetic_report() -> EvalReport:
    rows = []
    for model, scores in ACCURACY.items():
        for task, accuracy in scores.items():
            for i in range(20):
                correct = i < round(accuracy * 20)
                rows.append({"model": model, "suite": "testbed", "task": task, "example": i, "prompt": f"{task}:{i}=",
                             "answer": "a", "completion": "a" if correct else "b", "prediction": "a" if correct else "b",
                             "correct": correct, "num_tokens": 2})
    roles = resolve_roles(list(ACCURACY), ["addition", "reversal"])
    report = EvalReport(models={m: f"/ckpt/{m}" for m in ACCURACY}, rows=rows, roles=roles,
                        suites=[{"name": "testbed", "source": "testbed", "tasks": ["addition", "reversal"],
                                 "max_tokens": 12, "num_examples": 40}],
                        meta={"device": "cpu", "dtype": "float32", "num_actors": 2, "seconds": 1.0})
    report.gate_checks = check_gates(["merged>=0.9*specialist"], report.accuracy(), roles)
    return report


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_report_files(tmp_path, scheme):
    report = synthetic_report()
    assert report.accuracy() == ACCURACY
    out = str(tmp_path / "eval") if scheme == "file" else f"memory://eval-report-{id(report)}"
    written = write_report(report, out)
    assert sorted(written) == ["chart.png", "report.json", "report.md", "results.parquet"]
    table = pq.read_table(io.BytesIO(Location(written["results.parquet"]).read_bytes()))
    assert table.num_rows == 160 and table.column("correct").to_pylist().count(True) == 76
    markdown = Location(written["report.md"]).read_text()
    assert "| model | role | addition | reversal | mean |" in markdown
    assert "| ties | merged | 0.750 | 0.850 | 0.800 |" in markdown
    assert "| reversal | 0.850 | 0.200 (+0.650) | 0.100 (+0.750) | 1.000 (-0.150) | 85% of sft-reversal |" in markdown
    assert "FAIL: gate 'merged>=0.9*specialist' FAILED on task reversal" in markdown
    chart = Location(written["chart.png"]).read_bytes()
    assert chart.startswith(b"\x89PNG") and len(chart) > 5000
    summary = json.loads(Location(written["report.json"]).read_text())
    assert summary["accuracy"] == ACCURACY and summary["gates_passed"] is False
    record = next(a for a in summary["aggregates"] if a["model"] == "ties" and a["task"] == "addition")
    assert record["num_examples"] == 20 and record["stderr"] == pytest.approx((0.75 * 0.25 / 20) ** 0.5)


def test_work_units_cover_every_prompt_once():
    assert _units({"a": "x"}, 10, 2) == [("a", 0, 2), ("a", 1, 2)]  # fewer models than actors: split prompts
    assert _units({"a": "x", "b": "y", "c": "z"}, 10, 2) == [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    assert len(_units({"a": "x"}, 5000, 1)) == 5  # bounded units keep progress moving
    assert Example("t", "p", "a").regex is None


def test_engine_settings_for_cpu_and_gpu():
    options = EvalOptions(kv_cache_size=1 << 28, cpus_per_actor=0.5)
    cpu = engine_settings(options, "cpu")
    assert cpu.llm_kwargs["dtype"] == "float32" and cpu.llm_kwargs["kv_cache_memory_bytes"] == 1 << 28
    assert cpu.num_gpus == 0 and cpu.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and cpu.env["OMP_NUM_THREADS"] == "1"
    gpu = engine_settings(options, "gpu")
    assert gpu.num_gpus == 1 and gpu.llm_kwargs["dtype"] == "bfloat16"
    assert "kv_cache_memory_bytes" not in gpu.llm_kwargs and "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu.env
    assert engine_settings(options, "gpu", dtype="float32").llm_kwargs["dtype"] == "float32"  # the load check


def test_remote_checkpoints_are_copied_once_and_refreshed_when_changed(tmp_path):
    source = Location(f"memory://ckpt-cache-{id(tmp_path)}/model")
    source.child("config.json").write_bytes(b"{}")
    source.child("model.safetensors").write_bytes(b"weights")
    first = local_checkpoint(source, str(tmp_path))
    assert open(f"{first}/model.safetensors", "rb").read() == b"weights"
    assert local_checkpoint(source, str(tmp_path)) == first
    source.child("model.safetensors").write_bytes(b"new weights")
    assert local_checkpoint(source, str(tmp_path)) != first
    assert local_checkpoint(Location(first), str(tmp_path)) == first  # local folders are used in place


def test_cli_rejects_bad_input_before_starting_engines(tmp_path):
    runner = CliRunner()
    result = runner.invoke(eval_cmd, ["--suite", "testbed"])
    assert result.exit_code == 2 and "no models" in result.output
    result = runner.invoke(eval_cmd, ["--model", "m=/x", "--suite", "testbed"])
    assert result.exit_code == 2 and "--out is required" in result.output
    result = runner.invoke(eval_cmd, ["--model", "m=/x", "--suite", "testbed", "--out", str(tmp_path),
                                      "--gate", "merged=>base"])
    assert isinstance(result.exception, GateError) and "cannot parse gate 'merged=>base'" in str(result.exception)
