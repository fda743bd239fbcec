"""The serving benchmark's peer: the same CTR model served by TorchServe 0.12.

* :mod:`.ctr_model`: the synthetic CTR workload (requests, tables, dense MLP) both servers
  use.
* :mod:`.torchserve_handler`: the TorchServe custom handler doing the same work per batch.
* :mod:`.torchserve_peer`: installs TorchServe in its own venv, builds the model archive,
  starts TorchServe on loopback and stops it.

The load generator is :mod:`benchmarks.loadgen`.
"""
