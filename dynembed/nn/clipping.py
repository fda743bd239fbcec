"""clip_grad_norm_ over a model's dense gradients and its tables' queued ones together."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from dynembed._args import is_real
from dynembed.nn._base import TableModule, dense_parameters, named_tables


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, *,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clips the gradient norm of ``model``'s dense Parameters and of its tables' rows
    together, as ``torch.nn.utils.clip_grad_norm_`` does for Parameters alone.

    The rows' gradient is what the next :func:`~dynembed.sparse_step` applies: the
    gradients queued by tables with ``update_mode="deferred"``, summed per key (less the
    rows the step skips: keys erased since, NaN/inf rows of a table that skips them);
    tables of frozen modules (``requires_grad_(False)``) get none. The total
    norm is the ``norm_type``-norm of all of them and of the dense gradients; when it
    exceeds ``max_norm`` every one of them is scaled by ``max_norm / (total + 1e-6)``. Call
    it after the backward calls of a step and before the optimizers step. In a distributed
    job (``shard_model`` / ``Runtime.prepare``) it is a collective: each rank holds the
    queued gradients of its own rows of a sharded table, so every rank must call it.

    Args:
        model: the module holding the dynembed modules and dense Parameters.
        max_norm: the largest total norm allowed, > 0 (a Python or numpy number, or a
            one-element tensor).
        norm_type: the p of the p-norm, > 0 or ``math.inf``.
        error_if_nonfinite: raise when the total norm is NaN or inf (else, as torch, the
            gradients are scaled by what the NaN or inf gives).

    Returns:
        The total norm before clipping, a scalar tensor on the dense gradients' device
        (else the CPU).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``max_norm`` or ``norm_type`` is not a positive number; a trainable
            table of ``model`` updates its rows inside backward (``update_mode="fused"``),
            before any clipping could reach them (named).
        RuntimeError: ``error_if_nonfinite`` and the total norm is NaN or inf; nothing was
            scaled.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module holding dynembed modules, got "
                        f"{type(model).__name__}")
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not is_real(value) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    max_norm, norm_type = float(max_norm), float(norm_type)
    tables = _tables_with_gradients(model)
    fused = sorted(name for name, t in tables.items() if t.config.update_mode != "deferred")
    if fused:
        raise ValueError(
            f"tables {fused} update their rows inside backward (update_mode='fused'), before "
            "any clipping: build them with update_mode='deferred' (and call "
            "de.sparse_step(model)) to clip their gradients with the dense ones, or bound "
            "each row's update with the optimizer's max_grad_norm")
    params = [p for p in dense_parameters(model) if p.grad is not None]
    grads = [p.grad for p in params]
    device = grads[0].device if grads else torch.device("cpu")
    norms = [torch.nn.utils.get_total_norm(grads, norm_type).to(device)] if grads else []
    norms += [torch.tensor(n, dtype=torch.float32, device=device)
              for n in _table_norms(tables, norm_type)]
    if not norms:
        return torch.zeros((), device=device)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is "
                           f"{float(total)}, so they cannot be clipped; set "
                           "error_if_nonfinite=False to scale them all the same")
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    factor = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # torch's, as above
    if factor != 1.0:
        for table in tables.values():
            table.scale_queued_gradients(factor)
    return total


def _tables_with_gradients(model: nn.Module) -> dict:
    """The trainable tables that a module not frozen (its anchor requires a gradient) looks
    up: the others get no gradient, as torch's frozen Parameters."""
    looked_up = {id(table) for module in model.modules()
                 if isinstance(module, TableModule) and module._anchor.requires_grad
                 for table in module.named_tables().values()}
    return {name: table for name, table in named_tables(model).items()
            if table.trainable and id(table) in looked_up}


def _table_norms(tables: dict, norm_type: float) -> list[float]:
    """Each table's queued gradient norm; the shards of a table of a distributed job are
    combined over their ranks first (a replicated table's ranks each hold the whole)."""
    out, sharded = [], {}
    for name, table in sorted(tables.items()):
        norm = table.queued_gradient_norm(norm_type)
        if table.router is not None and table.config.placement != "replicated":
            sharded.setdefault(id(table.router), (table.router, []))[1].append(norm)
        else:
            out.append(norm)
    for router, norms in sharded.values():
        parts = torch.tensor(norms, dtype=torch.float64)
        if math.isinf(norm_type):
            dist.all_reduce(parts, op=dist.ReduceOp.MAX, group=router.exchange.group)
            out += parts.tolist()
        else:  # p-norms of the shards -> the p-norm of the whole
            parts = parts ** norm_type
            dist.all_reduce(parts, group=router.exchange.group)
            out += (parts ** (1.0 / norm_type)).tolist()
    return out
