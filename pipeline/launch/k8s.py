"""`pretrain submit --to k8s`: KubeRay manifests, applied with ``kubectl apply -f -``.

One-off: a ConfigMap with the resolved config and a ``RayJob`` that creates a Ray cluster (one head,
``launch.nodes`` workers with ``launch.gpus_per_node`` GPUs each, image from docker/Dockerfile.cuda),
runs prepare → Ray Train → eval as its entrypoint, and deletes the cluster afterwards.
Scheduled (``--schedule``): a KubeRay ``RayCronJob`` with the same job as its template, or (with
``launch.k8s.schedule_kind: CronJob``) a batch/v1 ``CronJob`` whose pod runs
``pretrain submit --to ray --wait`` against a standing RayCluster at ``launch.ray.address``.

Where the run lives: a pod's own disk is gone when the pod is, and other pods never see it. So
run_dir and data.output_dir are either on an object store (``s3://``, ``gs://``, ``az://``) or on
``launch.k8s.storage_claim``, which every pod mounts at ``launch.k8s.mount_path``; relative run_dir,
data and source paths are then placed under the mount, so every firing finds the previous firing's
checkpoints. Anything else is refused at rendering, naming the field. Pods run the image's ``python``
(launch.python overrides it) in the image's working directory (/opt/pretrain).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath

import yaml

from pydantic import BaseModel

from pipeline.config import ConfigError, PipelineConfig
from pipeline.launch.cluster import SubmitError, stage_commands

CODE_DIR = "/opt/pretrain"  # where the Dockerfiles put the project
CONFIG_DIR = "/etc/pretrain"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
ENV_SECRET = "pretrain-env"  # optional Secret (WANDB_API_KEY, ...) exported into every pod
OBJECT_STORES = ("s3://", "gs://", "az://")


def k8s_name(cfg: PipelineConfig) -> str:
    """A DNS-1123 name from the run name (lower case, digits, '-'; at most 50 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"pretrain-{cfg.name}".lower()).strip("-")
    return name[:50].rstrip("-")


def _under_mount(path: str | None, mount: str) -> str | None:
    if path is None:
        return None
    p = PurePosixPath(path)
    return str(p if p.is_absolute() else PurePosixPath(mount) / p)


def _check_storage(cfg: PipelineConfig) -> None:
    """run_dir and data.output_dir on an object store, or on the claim every pod mounts."""
    k = cfg.launch.k8s
    for field, value in (("run_dir", cfg.run_dir), ("data.output_dir", cfg.data.output_dir)):
        if value.startswith(OBJECT_STORES):
            continue
        if not k.storage_claim:
            raise ConfigError(
                f"{field}: {value} is a path on the pod's own disk, which other pods never see and which is "
                f"gone with the pod: set launch.k8s.storage_claim (a PersistentVolumeClaim, mounted at "
                f"launch.k8s.mount_path) or put {field} on an object store (s3://, gs://, az://)")
        p = PurePosixPath(value)
        if p.is_absolute() and not p.is_relative_to(k.mount_path):
            raise ConfigError(
                f"{field}: {value} is not under launch.k8s.mount_path ({k.mount_path}), where "
                f"launch.k8s.storage_claim is mounted: give a path relative to it or under it")


def pod_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Relative paths resolved under the shared volume's mount path (not the submitter's cwd); as they
    are without a claim (the run is on an object store, relative inputs are in the image)."""
    _check_storage(cfg)
    mount = cfg.launch.k8s.mount_path
    if not cfg.launch.k8s.storage_claim:
        return cfg
    data = cfg.data.model_copy(update={
        "output_dir": _under_mount(cfg.data.output_dir, mount),
        "sources": [s.model_copy(update={"path": _under_mount(s.path, mount)}) for s in cfg.data.sources],
        "tokenizer": cfg.data.tokenizer.model_copy(update={"path": _under_mount(cfg.data.tokenizer.path, mount)}),
    })
    return cfg.model_copy(update={"run_dir": _under_mount(cfg.run_dir, mount), "data": data})


def _container(cfg: PipelineConfig, name: str, gpus: int, command: list[str] | None = None) -> dict:
    k = cfg.launch.k8s
    resources = {"cpu": str(k.cpus_per_node), "memory": k.memory_per_node}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    c: dict = {
        "name": name,
        "image": k.image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "envFrom": [{"secretRef": {"name": ENV_SECRET, "optional": True}}],
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if command:
        c["command"] = command
    if k.storage_claim:
        c["volumeMounts"].append({"name": "shared", "mountPath": k.mount_path})
    return c


def _pod_spec(cfg: PipelineConfig, container: dict, restart: str | None = None) -> dict:
    volumes = [{"name": "config", "configMap": {"name": k8s_name(cfg) + "-config"}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # NCCL and DataLoader use /dev/shm
    if cfg.launch.k8s.storage_claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": cfg.launch.k8s.storage_claim}})
    spec = {"containers": [container], "volumes": volumes}
    if restart:
        spec["restartPolicy"] = restart
    return spec


def ray_job_spec(cfg: PipelineConfig) -> dict:
    """The RayJobSpec: the Ray cluster and the entrypoint (prepare → Ray Train → eval)."""
    k, launch = cfg.launch.k8s, cfg.launch
    commands = stage_commands(cfg.launch.python or "python", CONFIG_FILE, cfg.run_dir, "all", train_module="pipeline.launch.ray_train")
    return {
        "entrypoint": " && ".join([f"cd {CODE_DIR}"] + commands),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "backoffLimit": 2,  # each retry is a fresh cluster that resumes from the newest checkpoint
        "rayClusterSpec": {
            "rayVersion": k.ray_version,
            "headGroupSpec": {
                "rayStartParams": {"num-gpus": "0"},
                "template": {"spec": _pod_spec(cfg, _container(cfg, "ray-head", 0))},
            },
            "workerGroupSpecs": [{
                "groupName": "trainers",
                "replicas": launch.nodes,
                "minReplicas": launch.nodes,
                "maxReplicas": launch.nodes,
                "rayStartParams": {},
                "template": {"spec": _pod_spec(cfg, _container(cfg, "ray-worker", launch.gpus_per_node))},
            }],
        },
    }


def _unset(model: BaseModel) -> dict:
    """The fields left at a None default, as a pydantic exclude tree."""
    exclude: dict = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None and field.default is None:
            exclude[name] = True
        elif isinstance(value, BaseModel) and (sub := _unset(value)):
            exclude[name] = sub
    return exclude


def shipped_yaml(cfg: PipelineConfig) -> str:
    """The resolved config the pods read, without the fields left at a None default (`x: null`
    tells a reader nothing; loading it back gives the same config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=_unset(cfg)), sort_keys=False)


def render(cfg: PipelineConfig, schedule: str | None = None) -> list[dict]:
    """The manifests to apply, in order: the config's ConfigMap, then the RayJob / RayCronJob / CronJob."""
    cfg = pod_paths(cfg)
    k, name = cfg.launch.k8s, k8s_name(cfg)
    labels = {"app.kubernetes.io/name": "pretrain", "app.kubernetes.io/instance": name}
    meta = {"name": name, "namespace": k.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": dict(meta, name=name + "-config"),
        "data": {"config.yaml": shipped_yaml(cfg)},
    }
    if schedule is None:
        job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": ray_job_spec(cfg)}
    elif k.schedule_kind == "RayCronJob":
        job = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": meta,
               "spec": {"schedule": schedule, "jobTemplate": ray_job_spec(cfg)}}
    else:
        if not cfg.launch.ray.address:
            raise ConfigError("launch.k8s.schedule_kind CronJob submits to a standing RayCluster: set "
                              "launch.ray.address (e.g. http://raycluster-head-svc:8265)")
        command = ["pretrain", "submit", CONFIG_FILE, "--to", "ray", "--wait", "--address", cfg.launch.ray.address]
        pod = _pod_spec(cfg, _container(cfg, "submit", 0, command), restart="Never")
        pod["containers"][0]["resources"] = {"requests": {"cpu": "250m", "memory": "1Gi"},
                                             "limits": {"cpu": "1", "memory": "2Gi"}}
        job = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta, "spec": {
            "schedule": schedule,
            "concurrencyPolicy": "Forbid",  # the run lock would refuse an overlap anyway
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}}},
        }}
    return [config_map, job]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as readable `|` blocks; no YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_text(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)


def submit(cfg: PipelineConfig, *, dry_run: bool = False, schedule: str | None = None, out=print) -> int:
    text = to_text(render(cfg, schedule))
    if dry_run:
        out(text.rstrip("\n"))
        return 0
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SubmitError("`kubectl` is not on PATH: install it, or print the manifests with --dry-run and "
                          "apply them yourself (`... --dry-run | kubectl apply -f -`)")
    done = subprocess.run([kubectl, "apply", "-f", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise SubmitError(f"kubectl apply failed: {done.stderr.strip() or done.stdout.strip()}")
    out(done.stdout.rstrip("\n"))
    kind = "raycronjob" if schedule and cfg.launch.k8s.schedule_kind == "RayCronJob" else (
        "cronjob" if schedule else "rayjob")
    name, ns = k8s_name(cfg), cfg.launch.k8s.namespace
    out(f"  status: kubectl -n {ns} get {kind} {name}")
    if kind == "rayjob":
        out(f"  logs:   kubectl -n {ns} logs -f job/{name}   (the submitter pod follows the Ray job)")
    return 0
