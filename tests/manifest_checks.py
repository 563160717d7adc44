"""Readers and checkers for the manifests of deploy/ and infra/, the Dockerfiles and the shell examples of the
READMEs, shared by tests/test_manifests.py. Nothing here talks to a cluster or builds an image.

A "call" is one program a shell command runs that this repository provides: a script under pipelines/
(`python /home/ray/distmerge/pipelines/x.py ...`, also after `ray job submit --`) or a `distmerge` subcommand.
`check_call` parses its arguments with the program's own parser (click command or argparse `build_parser()`), so
a flag that does not exist, or a value it refuses, fails the test that found it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from distmerge.cli.options import build_run_options
from distmerge.options import RunOptions
from distmerge.production.spec import PipelineSpec, parse_spec
from distmerge.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted(p for d in ("deploy", "infra") for p in (REPO / d).rglob("*") if p.suffix in (".yaml", ".yml"))
READMES = [REPO / "deploy" / "README.md", REPO / "infra" / "README.md", REPO / "README.md"]
DOCKERFILES = {"cpu": REPO / "infra/docker/Dockerfile.cpu", "cuda": REPO / "infra/docker/Dockerfile.cuda"}
POD_OWNERS = ("RayCluster", "RayJob", "Deployment", "CronJob")


# --- manifests ----------------------------------------------------------------------------------------


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc.get("kind") == kind]


def names(kind: str) -> set[str]:
    return {doc["metadata"]["name"] for doc in objects(kind)}


def cluster_groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) of the head and every worker group of a RayClusterSpec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_cluster(name: str) -> dict:
    (spec,) = [c["spec"] for c in objects("RayCluster") if c["metadata"]["name"] == name]
    return spec


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod: Ray heads and workers, RayJob submitters, Deployments, CronJobs."""
    found = []
    for doc in [d for kind in POD_OWNERS for d in objects(kind)]:
        name, spec, kind = doc["metadata"]["name"], doc["spec"], doc["kind"]
        cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec") if kind == "RayJob" else None
        if cluster:
            found += [(f"{name}/{group}", g["template"]) for group, g in cluster_groups(cluster)]
        if kind == "RayJob" and spec.get("submitterPodTemplate"):
            found.append((f"{name}/submitter", spec["submitterPodTemplate"]))
        if kind == "Deployment":
            found.append((name, spec["template"]))
        if kind == "CronJob":
            found.append((name, spec["jobTemplate"]["spec"]["template"]))
    return found


def pod_specs() -> list[tuple[str, dict]]:
    return [(where, template["spec"]) for where, template in pod_templates()]


def volume_configmaps(volume: dict) -> list[tuple[str, bool]]:
    """(ConfigMap name, optional) of each ConfigMap a volume shows: a configMap or a projected volume."""
    if "configMap" in volume:
        return [(volume["configMap"]["name"], bool(volume["configMap"].get("optional")))]
    sources = volume.get("projected", {}).get("sources", [])
    return [(s["configMap"]["name"], bool(s["configMap"].get("optional"))) for s in sources if "configMap" in s]


def configmap_file(pod: dict, path: str) -> tuple[str, str]:
    """(ConfigMap, text) of the file at `path` in the first container of `pod`, which a ConfigMap volume holds."""
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
    mount = next((p for p in mounts if path.startswith(p + "/")), None)
    assert mount, f"{path} is on no volume mount of the pod ({sorted(mounts)})"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[mount]]
    key = path[len(mount) + 1:]
    for name, _ in volume_configmaps(volume):
        data = {c["metadata"]["name"]: c.get("data", {}) for c in objects("ConfigMap")}.get(name, {})
        if key in data:
            return name, data[key]
    pytest.fail(f"{path}: no ConfigMap of volume {volume['name']} has the key {key}")


def quantity(value) -> float:
    """Kubernetes quantity ('8', '500m', '32Gi', '1G') -> number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * units[unit]


def cluster_capacity(spec: dict) -> tuple[float, float]:
    """(Ray CPUs, Ray GPUs) of the worker groups of a RayClusterSpec, at their largest size."""
    cpus = gpus = 0.0
    for _name, group in cluster_groups(spec)[1:]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        pods = group["maxReplicas"] if spec.get("enableInTreeAutoscaling") else group.get("replicas", 0)
        cpus += pods * float(params.get("num-cpus", quantity(limits["cpu"])))
        gpus += pods * float(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0))))
    return cpus, gpus


def parse_config(key: str, text: str, where: str) -> tuple[str, object]:
    """('recipe', Recipe) or ('spec', PipelineSpec) of a ConfigMap file, by its name (*recipe.yaml, *spec.yaml)."""
    if key.endswith("recipe.yaml"):
        return "recipe", parse_recipe(yaml.safe_load(text), where)
    assert key.endswith("spec.yaml"), f"{where}: name a recipe *recipe.yaml and a pipeline spec *spec.yaml"
    return "spec", parse_spec(yaml.safe_load(text), where)


def config_urls(kind: str, config) -> list[str]:
    if kind == "recipe":
        return [config.base, config.output, config.target or config.base, *(m.path for m in config.models)]
    urls = [config.merge.base, config.merge.target or config.merge.base, config.publish.root, config.ledger_url,
            config.lease_url, *(s.url for s in config.merge.sources)]
    return urls + [s.partition("=")[2] for s in config.evaluation.suites if "=" in s]


def run_options(call: Call, spec: PipelineSpec | None) -> RunOptions:
    """How the merge of a call runs: `distmerge merge` flags, or a spec's `run` with --workers on top."""
    if spec is None:
        return build_run_options(RunOptions, call.params)
    workers = call.params.get("workers")
    return spec.run if workers is None else spec.run.model_copy(update={"workers": workers})


# --- Dockerfiles ----------------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and ARG defaults substituted into FROM."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", path.read_text())
    steps = [tuple((line.strip().split(None, 1) + [""])[:2]) for line in joined.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    return [(i.upper(), re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), a) if i == "FROM" else a)
            for i, a in steps]


def image_env(path: Path) -> dict[str, str]:
    return dict(kv.split("=", 1) for i, a in dockerfile(path) if i == "ENV" for kv in shlex.split(a))


def image_repo_dir() -> str:
    dirs = {[a for i, a in dockerfile(p) if i == "WORKDIR"][-1] for p in DOCKERFILES.values()}
    assert len(dirs) == 1, f"the images put the repository in different places: {dirs}"
    return dirs.pop()


def ray_image_tags() -> dict[str, tuple[str, str, str]]:
    """variant -> (ray version, python tag, accelerator tag) of each Dockerfile's FROM."""
    tags = {}
    for variant, path in DOCKERFILES.items():
        (image,) = [[t for t in a.split() if not t.startswith("--")][0] for i, a in dockerfile(path) if i == "FROM"]
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(3\d+)-(cpu|gpu|cu\d+)", image)
        assert match, f"{path.name}: FROM {image} is not a pinned rayproject/ray:<version>-py3XX-<cpu|gpu|cuXXX> tag"
        tags[variant] = match.groups()
    return tags


# --- commands -------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One program of this repository that a command runs, with its parsed arguments."""

    program: str  # a script relative to the repository (pipelines/merge.py) or "distmerge <subcommand>"
    args: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> str | None:
        """The recipe or spec file it reads, if any."""
        return self.params.get("recipe") or self.params.get("spec")


def invocations(command: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of each program of this repository that a shell command runs; `sh -c` is followed."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if set(token) <= set("();<>|&"):
            segments, current = segments + [current], []
        else:
            current.append(token)
    found = []
    for tokens in segments + [current]:
        for i, token in enumerate(tokens):
            if re.fullmatch(r"(.*/)?(ba)?sh", token) and tokens[i + 1:i + 2] == ["-c"]:
                found += invocations(tokens[i + 2])
                break
            if re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", token):
                rest = list(tokens[i + 1:])
                while rest and rest[0].startswith("-"):
                    rest = rest[1:]
                if rest and rest[0].endswith(".py"):
                    script = rest[0].removeprefix(image_repo_dir() + "/")
                    assert not script.startswith("/"), f"{script} is outside the image's copy of the repository"
                    found.append((script, rest[1:]))
                break
            runs_program = all(re.fullmatch(r"\w+=.*", t) for t in tokens[:i]) or tokens[i - 1] == "--"
            if re.fullmatch(r"(.*/)?distmerge", token) and runs_program and i + 1 < len(tokens):
                found.append((f"distmerge {tokens[i + 1]}", tokens[i + 2:]))
                break
    return found


def distmerge_command(name: str) -> click.Command:
    from distmerge.cli import cli

    command = cli.get_command(click.Context(cli), name)
    assert command is not None, f"`distmerge {name}` is not a subcommand"
    return command


def pipeline_parser(script: str) -> argparse.ArgumentParser:
    """The argparse parser of a pipelines/ script, from its build_parser() (loaded without running main)."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "build_parser"), f"{script} must define build_parser() so its flags can be checked"
    return module.build_parser()


def command_flags(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def check_call(program: str, args: list[str], where: str) -> Call:
    """Parse `args` as `program` would; fail the test with `where` if a flag or value is refused."""
    if program == "pipelines/merge.py":  # the merge command itself, as a script
        return check_call("distmerge merge", args, where)
    if program.startswith("distmerge "):
        name = program.split()[1]
        command = distmerge_command(name)
        while isinstance(command, click.Group) and args and not args[0].startswith("-"):
            # e.g. `distmerge vector extract ...`: check the subcommand
            sub = command.get_command(click.Context(command), args[0])
            assert sub is not None, f"{where}: `{program} {args[0]}` is not a subcommand"
            program, name, command, args = f"{program} {args[0]}", args[0], sub, args[1:]
        flags = command_flags(command)
        for arg in args:
            if arg == "--":
                break
            assert not arg.startswith("--") or arg.split("=")[0] in flags, \
                f"{where}: {arg} is not an option of `{program}`"
        try:
            ctx = command.make_context(name, list(args))
        except click.ClickException as exc:
            pytest.fail(f"{where}: `{program} {' '.join(args)}` rejected: {exc.format_message()}")
        return Call(program, args, ctx.params)
    assert (REPO / program).is_file(), f"{where}: {program} does not exist in the repository"
    if not program.startswith("pipelines/"):
        return Call(program, args)
    parser = pipeline_parser(program)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for arg in args:  # exact spellings: argparse would also take an abbreviation, which a new flag can break
        assert not arg.startswith("--") or arg.split("=")[0] in flags, f"{where}: {arg} is not an option of {program}"
    try:
        namespace = parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `python {program} {' '.join(args)}` rejected by its argument parser")
    return Call(program, args, vars(namespace))


def repo_file(path: str) -> Path | None:
    """The repository file a relative path in an example names, when it names one (else None)."""
    if Path(path).is_absolute() or "://" in path or not (REPO / Path(path).parts[0]).is_dir():
        return None
    return REPO / path


def job_commands() -> list[tuple[str, str, dict | None]]:
    """(where, shell command, RayJob or None) for every RayJob entrypoint and container command."""
    found = [(f"RayJob {d['metadata']['name']}", d["spec"]["entrypoint"], d) for d in objects("RayJob")]
    for where, pod in pod_specs():
        for c in pod["containers"]:
            if c.get("command") or c.get("args"):
                found.append((f"{where}/{c['name']}", shlex.join(c.get("command", []) + c.get("args", [])), None))
    return found


def readme_commands(path: Path) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]
