"""The manifests agree with what they run: the rendezvous torchrun would really use (parsed by
torchrun's own argument parser, after `dynembed train`'s), the checkpoint directory on the
shared volume, time to checkpoint after SIGTERM, the Redis wiring, the image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import PurePosixPath

import pytest

from dynembed.train.launch import TORCHRUN_ENV

from .manifests import K8S_DIR, ROOT, find, load_docs, manifest_files

# (file, kind, path of the pod template) of the manifests that train.
TRAINING = [
    ("pytorchjob-elastic.yaml", "PyTorchJob", ("spec", "pytorchReplicaSpecs", "Worker",
                                               "template")),
    ("statefulset-c10d.yaml", "StatefulSet", ("spec", "template")),
]
REDIS_URL = "redis://redis:6379/0"


def _template(file: str, kind: str, path: tuple[str, ...]) -> dict:
    node = find(file, kind)
    for key in path:
        node = node[key]
    return node


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _option(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _torchrun(argv: list[str], env: dict[str, str], monkeypatch, tmp_path):
    """torchrun's launch config and worker command for ``argv`` under ``env``."""
    from torch.distributed import run as torchrun

    monkeypatch.chdir(tmp_path)  # torchrun may create its log directory
    for name in [n for n in os.environ if n.startswith(("PET_", "TORCH_ELASTIC_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = torchrun.parse_args(argv)  # reads the PET_* defaults
    config, _, cmd_args = torchrun.config_from_args(args)
    return config, cmd_args


class _Spawned(Exception):
    """Raised instead of starting a process; carries its command line."""


def _dynembed_train_argv(args: list[str], monkeypatch, tmp_path) -> list[str]:
    """The command line ``dynembed train ARGS`` would start (stopped at subprocess.Popen)."""
    from dynembed import cli
    from dynembed.train import launch

    real_popen = subprocess.Popen

    def spawn(argv, *args, **kwargs):
        argv = list(argv)
        if argv[1:3] == ["-c", launch._STOP_WITH_PARENT]:  # torchrun, tied to the launcher
            raise _Spawned([argv[0], *argv[4:]])
        if argv[1:2] == ["-c"]:  # its check that -m's module exists (in the image)
            return real_popen([sys.executable, "-c", ""], *args, **kwargs)
        raise _Spawned(argv)

    monkeypatch.setattr(subprocess, "Popen", spawn)
    monkeypatch.chdir(tmp_path)  # it creates its log directory
    with pytest.raises(_Spawned) as spawned:
        cli.main(["train", *args])
    return spawned.value.args[0]


def _operator_env(job: dict) -> dict[str, str]:
    """The PET_* variables the training operator gives the workers of an elastic job
    (kubeflow/training-operator, pkg/controller.v1/pytorch/elastic.go)."""
    policy = job["spec"]["elasticPolicy"]
    env = {"PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:{policy['rdzvPort']}",
           "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
           "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}"}
    if "maxRestarts" in policy:
        env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
    if "rdzvId" in policy:
        env["PET_RDZV_ID"] = policy["rdzvId"]
    return env


def test_pytorchjob_runs_torchrun_on_the_operators_c10d_rendezvous(monkeypatch, tmp_path):
    job = find("pytorchjob-elastic.yaml", "PyTorchJob")
    spec, policy = job["spec"], job["spec"]["elasticPolicy"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic: workers, no master
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    container = _container(worker["template"]["spec"])
    # The operator finds the rendezvous port through these names.
    assert container["name"] == "pytorch"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["pytorchjob-port"] == policy["rdzvPort"]
    argv = container["command"] + container["args"]
    assert argv[0] == "torchrun"

    # Flags on the command line would override the operator's PET_* values: torchrun must
    # end up with the policy's settings.
    config, cmd_args = _torchrun(argv[1:], {**_env(container), **_operator_env(job)},
                                 monkeypatch, tmp_path)
    assert config.rdzv_backend == "c10d" == policy["rdzvBackend"]
    assert config.rdzv_endpoint == f"dynembed-ctr-worker-0:{policy['rdzvPort']}"
    assert (config.min_nodes, config.max_nodes) == (policy["minReplicas"],
                                                    policy["maxReplicas"])
    assert config.max_restarts == policy["maxRestarts"]
    assert config.run_id == policy["rdzvId"]
    assert config.nproc_per_node == int(spec["nprocPerNode"])
    assert config.shutdown_timeout == int(_env(container)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert cmd_args[cmd_args.index("-m") + 1] == "examples.elastic_ctr"
    # plain torchrun: restarted workers need a fresh rendezvous store (as dynembed train
    # sets it; pytorch/pytorch#135712)
    assert _env(container).items() >= TORCHRUN_ENV.items()


def test_statefulset_runs_dynembed_train_with_pod_0_as_rendezvous(monkeypatch, tmp_path):
    sts = find("statefulset-c10d.yaml", "StatefulSet")
    service = find("statefulset-c10d.yaml", "Service")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    container = _container(sts["spec"]["template"]["spec"])
    assert container["command"] == ["dynembed", "train"]

    for name, value in _env(container).items():  # the pod's environment: the launcher's
        monkeypatch.setenv(name, value)
    argv = _dynembed_train_argv(container["args"], monkeypatch, tmp_path)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    config, cmd_args = _torchrun(argv[3:], _env(container), monkeypatch, tmp_path)
    assert config.rdzv_backend == "c10d"
    host, port = config.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{sts['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {
        p["containerPort"] for p in container["ports"]}
    assert config.min_nodes <= sts["spec"]["replicas"] <= config.max_nodes
    assert config.max_restarts >= 1
    assert config.shutdown_timeout == int(_env(container)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert cmd_args[cmd_args.index("-m") + 1] == "examples.elastic_ctr"


@pytest.mark.parametrize("file, kind, path", TRAINING, ids=[t[1] for t in TRAINING])
def test_checkpoint_dir_is_on_a_shared_writable_volume(file, kind, path):
    pod = _template(file, kind, path)["spec"]
    container = _container(pod)
    ckpt = PurePosixPath(_option(container["args"], "--checkpoint-dir"))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (name,) = [n for n, m in mounts.items()
               if PurePosixPath(m["mountPath"]) in (ckpt, *ckpt.parents)
               and m["mountPath"] != "/"]
    assert not mounts[name].get("readOnly")
    volume = {v["name"]: v for v in pod["volumes"]}[name]
    claim = volume["persistentVolumeClaim"]
    assert not claim.get("readOnly")
    # The claim is in the same file, shared by every pod at once.
    (pvc,) = [d for d in load_docs(K8S_DIR / file)
              if d["kind"] == "PersistentVolumeClaim"
              and d["metadata"]["name"] == claim["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("file, kind, path", TRAINING, ids=[t[1] for t in TRAINING])
def test_workers_have_time_to_checkpoint_after_sigterm(file, kind, path):
    pod = _template(file, kind, path)["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    # torchrun kills its workers this long after SIGTERM, Kubernetes the pod after grace.
    shutdown = int(_env(_container(pod))["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert 60 <= shutdown < grace


@pytest.mark.parametrize("file, kind, path", TRAINING, ids=[t[1] for t in TRAINING])
def test_training_pods_run_the_image_the_dockerfile_builds(file, kind, path):
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "-t dynembed:latest" in dockerfile
    # torch's CPU build: the pin in pyproject.toml would otherwise get the CUDA wheel.
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    container = _container(_template(file, kind, path)["spec"])
    assert container["image"] == "dynembed:latest"
    # `-m examples.elastic_ctr` imports from the working directory the image copies to.
    assert f"WORKDIR {container['workingDir']}" in dockerfile
    assert "COPY examples ./examples" in dockerfile


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_selectors_pick_the_pods(path):
    docs = load_docs(path)
    templates = [d["spec"]["template"] for d in docs if d["kind"] in ("StatefulSet",
                                                                          "Deployment")]
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"].items()
            assert any(selector <= t["metadata"]["labels"].items() for t in templates)


def test_redis_is_where_the_url_points_and_never_evicts():
    service, deployment = find("redis.yaml", "Service"), find("redis.yaml", "Deployment")
    host, port = REDIS_URL.removeprefix("redis://").split("/")[0].split(":")
    assert service["metadata"]["name"] == host
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port)
    container = _container(deployment["spec"]["template"]["spec"])
    assert service_port["targetPort"] in {p["name"] for p in container["ports"]}
    # Evicting keys would silently lose embedding rows.
    assert _option(container["args"], "--maxmemory-policy") == "noeviction"
    assert _option(container["args"], "--appendonly") == "yes"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    # The docs and the training manifests' hints use the same URL.
    assert REDIS_URL in (ROOT / "docs" / "kubernetes.md").read_text()
    for file, _, _ in TRAINING:
        assert REDIS_URL in (K8S_DIR / file).read_text()


def test_docs_cover_every_manifest():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for path in manifest_files():
        assert f"kubectl apply -f deploy/k8s/{path.name}" in text
    assert "deploy/Dockerfile" in text
