"""`shardlens schedule`: deployment files for running a campaign on a cluster or a timer.

Targets:
- kuberay: raycluster.yaml (a long-running cluster), configmap.yaml (the campaign file),
  rayjob.yaml (one run), raycronjob.yaml (runs on the schedule; KubeRay 1.6+, alpha).
- cronjob: raycluster.yaml, configmap.yaml, and cronjob.yaml, a plain Kubernetes CronJob
  that calls `shardlens submit` against the RayCluster.
- systemd: <name>.service and <name>.timer for one large machine.
Manifests are built as data and written as YAML, with a comment saying what each is for.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import yaml

from shardlens.tracer.campaign import load_campaign
from shardlens.version import __version__

TEMPLATES = Path(__file__).resolve().parent / "templates"
IMAGE = f"ghcr.io/shardlens/shardlens:{__version__}"
RAY_VERSION = "2.60.0"
TARGETS = ("kuberay", "cronjob", "systemd")


def k8s_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123 label) made from a campaign name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50]
    if not name:
        raise ValueError(f"cannot make a Kubernetes name from {text!r}")
    return name


def cron_to_calendar(cron: str) -> str:
    """A 5-field cron expression of numbers, lists and * as a systemd OnCalendar value."""
    fields = cron.split()
    if len(fields) != 5 or not all(re.fullmatch(r"\*|\d+(,\d+)*", f) for f in fields):
        raise ValueError(f"--cron takes 5 fields of numbers, lists (1,15) or * (e.g. '0 2 * * *'); got {cron!r}")
    minute, hour, day, month, weekday = fields
    days = {"0": "Sun", "1": "Mon", "2": "Tue", "3": "Wed", "4": "Thu", "5": "Fri", "6": "Sat", "7": "Sun"}
    prefix = "" if weekday == "*" else ",".join(days[d] for d in weekday.split(",")) + " "
    pad = lambda f: f if f == "*" else ",".join(v.zfill(2) for v in f.split(","))  # noqa: E731
    return f"{prefix}*-{pad(month)}-{pad(day)} {pad(hour)}:{pad(minute)}:00"


def _volumes(name: str, shm: str) -> tuple[list, list]:
    mounts = [
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "hf-cache", "mountPath": "/home/shardlens/.cache/huggingface"},
        {"name": "results", "mountPath": "/results"},
        {"name": "campaign", "mountPath": "/campaigns"},
    ]
    volumes = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "hf-cache", "persistentVolumeClaim": {"claimName": f"{name}-hf-cache"}},
        {"name": "results", "persistentVolumeClaim": {"claimName": f"{name}-results"}},
        {"name": "campaign", "configMap": {"name": f"{name}-campaign"}},
    ]
    return mounts, volumes


def cluster_spec(name: str, *, gpu_workers: int, gpus_per_worker: int, image: str) -> dict:
    """A RayCluster spec: a CPU head and a group of GPU workers, with /dev/shm sized for
    Ray's object store, a shared Hugging Face cache and a results volume."""
    head_mounts, head_volumes = _volumes(name, "16Gi")
    worker_mounts, worker_volumes = _volumes(name, "32Gi")
    head = {
        "name": "ray-head", "image": image,
        "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}, {"containerPort": 10001, "name": "client"}],
        "volumeMounts": head_mounts,
    }
    gpu = {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": str(gpus_per_worker)}
    worker = {"name": "ray-worker", "image": image, "resources": {"requests": gpu, "limits": gpu}, "volumeMounts": worker_mounts}
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"}, "template": {"spec": {"containers": [head], "volumes": head_volumes}}},
        "workerGroupSpecs": [{
            "groupName": "gpu", "replicas": gpu_workers, "minReplicas": gpu_workers, "maxReplicas": gpu_workers,
            "rayStartParams": {}, "template": {"spec": {"containers": [worker], "volumes": worker_volumes}},
        }],
    }


def _manifest(comment: str, obj: dict) -> str:
    lines = "".join(f"# {line}\n" for line in comment.strip().splitlines())
    return lines + yaml.safe_dump(obj, sort_keys=False, width=120)


def render(
    campaign_path: str, *, cron: str, target: str, gpu_workers: int = 2, gpus_per_worker: int = 1,
    image: str = IMAGE, workdir: str = "/opt/shardlens",
) -> dict[str, str]:
    """The deployment files of a campaign for one target: file name -> text."""
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}; got {target!r}")
    campaign = load_campaign(campaign_path)
    stem = Path(campaign_path).stem
    name = k8s_name(campaign.name)
    entry = f"shardlens run /campaigns/{stem}.yaml"
    if target == "systemd":
        calendar = cron_to_calendar(cron)
        fields = dict(name=name, campaign=campaign.name, campaign_path=f"{workdir}/campaigns/{Path(campaign_path).name}",
                      workdir=workdir, cron=cron, calendar=calendar)
        return {f"{name}.service": Template((TEMPLATES / "service").read_text()).substitute(fields),
                f"{name}.timer": Template((TEMPLATES / "timer").read_text()).substitute(fields)}
    spec = cluster_spec(name, gpu_workers=gpu_workers, gpus_per_worker=gpus_per_worker, image=image)
    files = {
        "raycluster.yaml": _manifest(
            f"A long-running Ray cluster for {campaign.name}: a CPU head and {gpu_workers} GPU workers.\n"
            f"Submit to it with: shardlens submit {stem}.yaml --address http://{name}-head-svc:8265",
            {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name}, "spec": spec}),
        "configmap.yaml": _manifest(
            f"The campaign file, mounted at /campaigns/{stem}.yaml.",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-campaign"},
             "data": {f"{stem}.yaml": Path(campaign_path).read_text()}}),
    }
    job = {"entrypoint": entry, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600, "rayClusterSpec": spec}
    if target == "kuberay":
        files["rayjob.yaml"] = _manifest(
            "One run of the campaign: KubeRay makes a Ray cluster, runs the entrypoint, and deletes the cluster after.\n"
            "Results go to the /results PersistentVolumeClaim, or to the campaign's s3:// output path.",
            {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name}, "spec": job})
        files["raycronjob.yaml"] = _manifest(
            f"The campaign on the schedule {cron!r}: a RayJob made at every tick.\n"
            "RayCronJob is alpha in KubeRay 1.6+: enable the operator's feature gate RayCronJob\n"
            "(helm: --set featureGates[0].name=RayCronJob --set featureGates[0].enabled=true).",
            {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": name}, "spec": {"schedule": cron, "jobTemplate": job}})
    else:
        container = {
            "name": "submit", "image": image,
            "command": ["shardlens", "submit", f"/campaigns/{stem}.yaml", "--address", f"http://{name}-head-svc:8265"],
            "volumeMounts": [{"name": "campaign", "mountPath": "/campaigns"}],
        }
        pod = {"restartPolicy": "OnFailure", "containers": [container], "volumes": [{"name": "campaign", "configMap": {"name": f"{name}-campaign"}}]}
        files["cronjob.yaml"] = _manifest(
            "Without RayCronJob: a plain Kubernetes CronJob submitting the campaign to the RayCluster of raycluster.yaml.",
            {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": f"{name}-submit"},
             "spec": {"schedule": cron, "concurrencyPolicy": "Forbid", "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": pod}}}}})
    return files


def write(files: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


__all__ = ["cron_to_calendar", "render", "write"]
