"""Every document of every manifest in deploy/k8s against its real schema, offline; and a
deliberately broken copy of each must fail, so the validators are known to check.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest

from .manifests import (
    CRD_PATH,
    CRD_UPSTREAM_CHARS,
    crd_body,
    load_docs,
    manifest_files,
    parse_yaml,
    validate,
)

DOCS = [(path.name, doc) for path in manifest_files() for doc in load_docs(path)]


def _id(file_and_doc) -> str:
    file, doc = file_and_doc
    return f"{file}:{doc['kind']}/{doc['metadata']['name']}"


def test_the_manifests_are_there():
    assert {path.name for path in manifest_files()} >= {
        "pytorchjob-elastic.yaml", "statefulset-c10d.yaml", "redis.yaml"}
    kinds = {doc["kind"] for _, doc in DOCS}
    assert kinds >= {"PyTorchJob", "StatefulSet", "Service", "PersistentVolumeClaim",
                     "Deployment"}


@pytest.mark.parametrize("file_and_doc", DOCS, ids=_id)
def test_document_matches_its_schema(file_and_doc):
    _, doc = file_and_doc
    validate(doc)


def test_names_are_unique_per_kind():
    names = [(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS]
    assert len(names) == len(set(names))


def _break(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with the dotted ``path`` set to ``value``, or removed if it is DROP."""
    broken = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = broken
    for key in parents:
        node = node[key]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return broken


DROP = object()
_POD = "spec.template.spec"
_WORKER_POD = "spec.pytorchReplicaSpecs.Worker.template.spec"

# Per kind: ways to break a copy, each against one rule of the real schema: a type, a
# required field, an unknown (misspelt) field, a range, a pattern.
BROKEN = {
    "PersistentVolumeClaim": [
        ("access modes not a list", "spec.accessModes", "ReadWriteMany"),
        ("misspelt field", "spec.accesModes", ["ReadWriteMany"]),
    ],
    "Service": [
        ("port not a number", "spec.ports.0.port", "rdzv"),
        ("port missing", "spec.ports.0.port", DROP),
        ("misspelt field", "spec.clusterIp", "None"),
    ],
    "StatefulSet": [
        ("replicas not a number", "spec.replicas", "two"),
        ("selector missing", "spec.selector", DROP),
        ("container name missing", f"{_POD}.containers.0.name", DROP),
        ("misspelt pod field", f"{_POD}.terminationGracePeriod", 300),
    ],
    "Deployment": [
        ("replicas not a number", "spec.replicas", "one"),
        ("selector missing", "spec.selector", DROP),
        ("probe port not int-or-string", f"{_POD}.containers.0.readinessProbe.tcpSocket.port",
         [6379]),
    ],
    "PyTorchJob": [
        ("replicas not a number", "spec.pytorchReplicaSpecs.Worker.replicas", "two"),
        ("replica specs missing", "spec.pytorchReplicaSpecs", DROP),
        ("misspelt elastic field", "spec.elasticPolicy.nProcsPerNode", 1),
        ("maxReplicas beyond int32", "spec.elasticPolicy.maxReplicas", 2**31),
        ("rdzvBackend not a string", "spec.elasticPolicy.rdzvBackend", ["c10d"]),
        ("containers missing", f"{_WORKER_POD}.containers", DROP),
        ("image not a string", f"{_WORKER_POD}.containers.0.image", 7),
        ("bad memory quantity", f"{_WORKER_POD}.containers.0.resources.limits.memory",
         "16 gigs"),
    ],
}

BROKEN_CASES = [(file, doc, *case) for file, doc in DOCS for case in BROKEN.get(doc["kind"], [])]


def test_every_kind_has_broken_copies():
    assert {doc["kind"] for _, doc in DOCS} <= BROKEN.keys()


@pytest.mark.parametrize("file, doc, why, path, value", BROKEN_CASES,
                         ids=[f"{_id((c[0], c[1]))}-{c[2]}" for c in BROKEN_CASES])
def test_broken_copy_fails_where_it_was_broken(file, doc, why, path, value):
    with pytest.raises(jsonschema.ValidationError) as failure:
        validate(_break(doc, path, value))
    # Reported at the broken field, or at its parent for a missing or unknown field: it
    # failed for the reason we meant, not for another.
    where = ".".join(str(p) for p in failure.value.absolute_path)
    assert where in (path, path.rpartition(".")[0]), failure.value.message


def test_vendored_crd_is_the_whole_upstream_file():
    body = crd_body()
    assert len(body) == CRD_UPSTREAM_CHARS
    assert body.startswith("---\napiVersion: apiextensions.k8s.io/v1\n")
    assert body.endswith("      status: {}\n")
    header = CRD_PATH.read_text()[: -len(body)]
    assert all(line.startswith("#") for line in header.splitlines())
    assert "c20bf65e03b85543c0b2ff25b14c7e335cce34f9" in header
    crd = parse_yaml(body)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "pytorchjobs.kubeflow.org"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["pytorchReplicaSpecs"]
    assert {"minReplicas", "maxReplicas", "rdzvBackend", "maxRestarts", "rdzvPort",
            "rdzvId"} <= spec["properties"]["elasticPolicy"]["properties"].keys()
    pod = (spec["properties"]["pytorchReplicaSpecs"]["additionalProperties"]["properties"]
           ["template"]["properties"]["spec"])
    # Upstream spells the Container schema out twice (containers, initContainers): equal
    # copies 30 kB apart say the file was read back intact.
    assert pod["properties"]["containers"]["items"] == pod["properties"]["initContainers"]["items"]
    assert pod["required"] == ["containers"]
