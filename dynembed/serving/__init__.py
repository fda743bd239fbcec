"""Serving: model packages and a TorchServe-compatible server for models with dynamic tables.

    de.serving.export_package("store/ctr-1.0", embeddings=model.embeddings, dense=model.mlp,
                              name="ctr", version="1.0", output="sigmoid")
    # dynembed serve --model-store store --models ctr=ctr-1.0
"""

from dynembed.serving.handler import EmbeddingModelHandler, InputError
from dynembed.serving.package import (
    Package,
    PackageError,
    export_package,
    open_package,
    read_manifest,
)
from dynembed.serving.registry import Registry, ServingError
from dynembed.serving.server import ModelServer, ServerConfig

__all__ = [
    "EmbeddingModelHandler",
    "InputError",
    "ModelServer",
    "Package",
    "PackageError",
    "Registry",
    "ServerConfig",
    "ServingError",
    "export_package",
    "open_package",
    "read_manifest",
]
