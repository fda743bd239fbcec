"""Loading the manifests of deploy/k8s and validating them against their real schemas, offline.

Core resources (Service, StatefulSet, PVC, Deployment...) go to the Kubernetes JSON schemas
that kubernetes-validate ships; the PyTorchJob goes to the openAPIV3Schema of the training
operator's CRD, vendored in schemas/. Both are strict: an unknown field fails, as it does
with kubectl's (default) strict server-side field validation, so a misspelt field cannot
pass as "ignored".
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
CRD_PATH = Path(__file__).parent / "schemas" / "kubeflow.org_pytorchjobs.yaml"
CRD_UPSTREAM_CHARS = 609049
"""Length of the upstream CRD file (without our header): the vendored copy must match."""

# The oldest Kubernetes the examples claim to support, and the newest with bundled schemas.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

# libyaml when present: the vendored CRD is 600 kB, 10x slower with the pure-Python loader.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str):
    """One YAML document (safe loader)."""
    return yaml.load(text, Loader=_LOADER)


def load_docs(path: Path) -> list[dict]:
    """The non-empty documents of a (multi-document) YAML file."""
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_LOADER) if doc is not None]


def manifest_files() -> list[Path]:
    """Every manifest in deploy/k8s."""
    return sorted(K8S_DIR.glob("*.yaml"))


def find(file: str, kind: str) -> dict:
    """The one document of ``kind`` in deploy/k8s/``file``."""
    (doc,) = [d for d in load_docs(K8S_DIR / file) if d["kind"] == kind]
    return doc


def validate(doc: dict) -> None:
    """Checks one manifest document against its schema.

    Raises:
        jsonschema.ValidationError: the document breaks its schema (kubernetes-validate's
            ValidationError is a subclass).
        kubernetes_validate.SchemaNotFoundError: no schema for its kind: nothing checked.
    """
    if doc.get("apiVersion") == "kubeflow.org/v1" and doc.get("kind") == "PyTorchJob":
        _pytorchjob_validator().validate(doc)
        # The CRD embeds a copy of the pod schema; check each pod template against the
        # official one as well.
        for rtype, spec in doc["spec"]["pytorchReplicaSpecs"].items():
            _validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{doc['metadata']['name']}-{rtype.lower()}"},
                            "template": spec["template"]})
    else:
        _validate_core(doc)


def _validate_core(doc: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def crd_body() -> str:
    """The vendored CRD without the header comment we added (from its first ``---`` on)."""
    text = CRD_PATH.read_text()
    return text[text.index("\n---\n") + 1:]


@functools.cache
def _pytorchjob_validator() -> jsonschema.protocols.Validator:
    crd = parse_yaml(crd_body())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(version["schema"]["openAPIV3Schema"])
    # OpenAPI v3.0 schemas are (a subset of) JSON Schema draft 4 with x- extensions, which
    # jsonschema ignores.
    return jsonschema.Draft4Validator(schema, format_checker=_formats())


def _closed(schema):
    """A copy of an OpenAPI schema where objects with declared properties reject others.

    The API server prunes unknown fields of custom resources, and kubectl's strict field
    validation turns them into errors; JSON Schema allows them unless told otherwise.
    Objects that keep unknown fields (x-kubernetes-preserve-unknown-fields) stay open.
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _closed(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = _closed(value)
        else:
            out[key] = copy.deepcopy(value)
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _formats() -> jsonschema.FormatChecker:
    """Range checks of OpenAPI's integer formats (the API server rejects overflows)."""
    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("int32")
    def int32(value) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def int64(value) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker
