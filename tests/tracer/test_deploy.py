"""deploy/: every file parses, has what its CRD requires, and names commands the CLI accepts."""

import contextlib
import hashlib
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from shardlens.tracer.campaign import load_campaign
from shardlens.tracer.cli import build_parser
from shardlens.tracer.schedule import cron_to_calendar, render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CAMPAIGN = ROOT / "examples" / "induction" / "campaign.yaml"
SERVICE = ROOT / "examples" / "serve" / "service.yaml"  # the local example, whose token is public
YAMLS = sorted(DEPLOY.rglob("*.yaml"))

# KubeRay and Kubernetes field paths each kind must have (KubeRay v1 CRD names).
REQUIRED = {
    "RayCluster": ["spec.headGroupSpec.rayStartParams", "spec.headGroupSpec.template.spec.containers", "spec.workerGroupSpecs"],
    "RayJob": ["spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.template.spec.containers"],
    "RayService": ["spec.serveConfigV2", "spec.rayClusterConfig.headGroupSpec.template.spec.containers",
                   "spec.rayClusterConfig.workerGroupSpecs"],
    "RayCronJob": ["spec.schedule", "spec.jobTemplate.entrypoint", "spec.jobTemplate.rayClusterSpec.headGroupSpec"],
    "CronJob": ["spec.schedule", "spec.jobTemplate.spec.template.spec.containers"],
    "ConfigMap": ["data"],
}
# Where a kind keeps its RayCluster spec: the head group, the GPU worker groups, the volumes.
CLUSTER_SPEC = {"RayCluster": "spec", "RayService": "spec.rayClusterConfig"}


def field(obj, path):
    for key in path.split("."):
        assert isinstance(obj, dict) and key in obj, f"missing {path}"
        obj = obj[key]
    return obj


def k8s_objects():
    for path in YAMLS:
        for obj in yaml.safe_load_all(path.read_text()):
            if isinstance(obj, dict) and "kind" in obj:
                yield path.name, obj


def test_every_yaml_parses():
    assert len(YAMLS) >= 6
    for path in YAMLS:
        assert list(yaml.safe_load_all(path.read_text())), path


@pytest.mark.parametrize("name, obj", list(k8s_objects()), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_objects_have_what_their_crd_requires(name, obj):
    assert obj["apiVersion"] in ("ray.io/v1", "batch/v1", "v1") and obj["metadata"]["name"]
    for path in REQUIRED[obj["kind"]]:
        field(obj, path)
    if obj["kind"] in CLUSTER_SPEC:
        cluster = field(obj, CLUSTER_SPEC[obj["kind"]])
        for group in cluster["workerGroupSpecs"]:
            assert group["groupName"] and group["replicas"] >= 1 and field(group, "template.spec.containers")
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            assert int(gpus) >= 1
        volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and "persistentVolumeClaim" in volumes["hf-cache"]


def test_the_configmap_holds_a_valid_campaign(tmp_path):
    configmap = yaml.safe_load((DEPLOY / "kuberay" / "configmap.yaml").read_text())
    (name, text), = configmap["data"].items()
    (tmp_path / name).write_text(text)
    assert load_campaign(tmp_path / name).name == "induction-heads"


def kuberay_file(name):
    return yaml.safe_load((DEPLOY / "kuberay" / name).read_text())


def pod_specs(cluster):
    """The head's pod spec, then each worker group's."""
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's schema on pydantic 2
def test_the_rayservice_runs_the_service_app_on_the_mounted_config():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    service, configmap = kuberay_file("rayservice.yaml"), kuberay_file("serve-configmap.yaml")
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    # Serve ignores keys it does not know (a misspelt http_options would fall back to its defaults).
    assert set(raw) <= set(ServeDeploySchema.model_fields) and raw["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert all(set(app) <= set(ServeApplicationSchema.model_fields) for app in raw["applications"])
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert (app.name, app.route_prefix) == ("shardlens", "/")
    # Every node mounts the ConfigMap where the application's args say the config is: Serve
    # may build the application on any node, and the GPU workers hold the models.
    (key,) = configmap["data"]
    for pod in pod_specs(service["spec"]["rayClusterConfig"]):
        (volume,) = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]]
        (mount,) = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume]
        assert app.args["config"] == f"{mount.rstrip('/')}/{key}"
        # KubeRay's Service and probes find Serve's port by the container port named "serve".
        assert {p["containerPort"] for c in pod["containers"] for p in c.get("ports", []) if p["name"] == "serve"} == {8000}
    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name, None)), f"{app.import_path} names no callable"


def test_the_serve_configmap_holds_a_valid_service_config(tmp_path):
    import shardlens as sl
    from shardlens.serve.config import load_config

    configmap = kuberay_file("serve-configmap.yaml")
    (name, text), = configmap["data"].items()
    config = yaml.safe_load(text)
    head = kuberay_file("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (hf_cache,) = [m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == "hf-cache"]
    for model in config["models"]:  # models live on the hf-cache volume; here, the shipped demo model stands in
        assert model["source"].startswith(hf_cache + "/"), model["source"]
        model["source"] = str(Path(sl.__file__).parent / "data" / "induction")
    (tmp_path / name).write_text(yaml.safe_dump(config))
    loaded = load_config(tmp_path / name)
    assert [m.name for m in loaded.models] == [m["name"] for m in config["models"]]
    # A manifest for a shared cluster lets in none of the example's tokens (the README prints them).
    public = {token["sha256"] for token in yaml.safe_load(SERVICE.read_text())["tokens"]}
    assert public and not public & {token.sha256 for token in loaded.tokens}


def readme_section(title):
    text = (DEPLOY / "README.md").read_text()
    assert f"## {title}" in text, f"deploy/README.md has no section {title!r}"
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_the_readme_starts_the_service_and_connects_in_two_commands():
    section = readme_section("A shared tracing service")
    first = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1).strip().splitlines()
    assert len(first) == 2, first
    serve, connect = (shlex.split(line) for line in first)
    assert serve[:3] == ["shardlens", "serve", str(SERVICE.relative_to(ROOT))]
    build_parser().parse_args(serve[1:])
    assert connect[:2] == ["python", "-c"]
    compile(connect[2], "<readme>", "exec")
    # The client asks for a model the example config serves, with a token whose hash it holds.
    service = yaml.safe_load(SERVICE.read_text())
    model, token = (re.search(rf"{key}='([^']+)'", connect[2]).group(1) for key in ("model", "token"))
    assert model in [m["name"] for m in service["models"]]
    assert hashlib.sha256(token.encode()).hexdigest() in [t["sha256"] for t in service["tokens"]]


def test_every_shardlens_command_in_the_readme_parses():
    commands = [shlex.split(line) for block in re.findall(r"```sh\n(.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
                for line in block.splitlines() if line.startswith("shardlens ")]
    assert {c[1] for c in commands} >= {"serve", "token"}
    for command in commands:
        build_parser().parse_args(command[1:])


def shardlens_commands():
    commands = []
    for _, obj in k8s_objects():
        stack = [obj]
        while stack:  # every RayJob entrypoint and container command, at any depth
            item = stack.pop()
            if isinstance(item, dict):
                if isinstance(item.get("entrypoint"), str):
                    commands.append(shlex.split(item["entrypoint"]))
                if isinstance(item.get("command"), list) and item["command"][0] == "shardlens":
                    commands.append(item["command"])
                stack += list(item.values())
            elif isinstance(item, list):
                stack += item
    for path in (DEPLOY / "systemd").glob("*.service"):
        line = next(l for l in path.read_text().splitlines() if l.startswith("ExecStart="))
        words = shlex.split(line.removeprefix("ExecStart="))
        commands.append(["shardlens"] + words[1:])
    return commands


def test_every_shardlens_command_parses_with_the_cli():
    commands = shardlens_commands()
    assert {c[1] for c in commands} >= {"run", "submit"}
    for command in commands:
        assert command[0] == "shardlens"
        build_parser().parse_args(command[1:])


def test_the_committed_files_are_what_schedule_writes():
    rendered = {}
    for target, folder in (("kuberay", "kuberay"), ("cronjob", "kuberay"), ("systemd", "systemd")):
        for name, text in render(str(CAMPAIGN), cron="0 2 * * *", target=target).items():
            rendered[f"{folder}/{name}"] = text
    for name, text in rendered.items():
        assert (DEPLOY / name).read_text() == text, f"deploy/{name} is stale: rerun shardlens schedule (see deploy/README.md)"


@pytest.mark.parametrize("cron, calendar", [
    ("0 2 * * *", "*-*-* 02:00:00"),
    ("30 4 1 * *", "*-*-01 04:30:00"),
    ("0 0 * * 1,5", "Mon,Fri *-*-* 00:00:00"),
    ("15 3,15 * 6 *", "*-06-* 03,15:15:00"),
])
def test_cron_to_systemd_calendar(cron, calendar):
    assert cron_to_calendar(cron) == calendar


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="5 fields"):
        cron_to_calendar("*/5 * * * *")
    with pytest.raises(ValueError, match="--target"):
        render(str(CAMPAIGN), cron="0 2 * * *", target="nomad")


def test_dockerfile_runs_as_a_non_root_user_on_cuda():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:" in text
    assert "USER shardlens" in text and (ROOT / ".dockerignore").exists()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_a_campaign_to_a_ray_head_end_to_end(tmp_path, monkeypatch):
    """ray start --head on 127.0.0.1 (its own temp dir), shardlens submit, wait, check the
    dataset, then stop exactly the processes of that Ray instance."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    import shardlens as sl
    from shardlens.tracer.cli import main

    ray_temp = tempfile.mkdtemp(prefix="slray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    # A throwaway head on the loopback address: no token authentication, no usage stats.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", ray_temp,
             "--num-cpus", "2", "--disable-usage-stats"]
    # Its agents get free ports too: the defaults (52365, ...) are taken while the test
    # session's own Ray instance runs, and a job agent that cannot listen never comes up.
    for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                   "--metrics-export-port", "--ray-client-server-port"):
        start += [option, str(free_port())]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        folder = tmp_path / "campaign"
        folder.mkdir()
        (folder / "prompts.jsonl").write_text("\n".join((ROOT / "examples" / "induction" / "prompts.jsonl").read_text().splitlines()[:8]) + "\n")
        model = Path(sl.__file__).parent / "data" / "induction"
        (folder / "tiny.yaml").write_text(f"""name: tiny
model: {{source: {model}}}
cluster: {{backend: local}}
data: {{path: prompts.jsonl, batch_size: 4}}
experiments:
  - {{name: heads, kind: sweep, points: z, over: [layer, head], positions: [22]}}
output: {{path: {tmp_path / 'out'}, plots: false}}
""")
        assert main(["submit", str(folder / "tiny.yaml"), "--address", f"http://127.0.0.1:{dashboard}", "--job-id", "shardlens-e2e"]) == 0
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        deadline = time.monotonic() + 240
        while client.get_job_status("shardlens-e2e") not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, client.get_job_logs("shardlens-e2e")[-2000:]
            time.sleep(1)
        assert client.get_job_status("shardlens-e2e") == JobStatus.SUCCEEDED, client.get_job_logs("shardlens-e2e")[-2000:]
        parts = sorted((tmp_path / "out" / "heads").glob("part-*.parquet"))
        assert len(parts) == 2
        assert (tmp_path / "out" / "summary.json").exists()
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if any(ray_temp in arg for arg in (p.info["cmdline"] or []))]
        for process in ours:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(ours, timeout=20)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        assert ours, "found none of the Ray instance's processes to stop"
