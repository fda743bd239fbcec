"""Sparse optimizer update rules on unique rows, in place.

Each kernel updates ``weights[slots[i]]`` (and its optimizer state) with the combined
gradient ``grads[i]``. Slots are unique, so rows are updated in parallel without races.
The formulas follow torch.optim (SGD, Adagrad, SparseAdam) and FBGEMM (row-wise Adagrad)
exactly, so a dynamic table trains to the same weights as a static one. Arithmetic is
float32 like theirs; the caller passes float32 hyperparameters so nothing widens to float64
(which would halve the SIMD width).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from dynembed.kernels._threads import adaptive


_ONE = np.float32(1.0)


@nb.njit(inline="always", cache=True)
def _clip_scale(grads, i, max_norm):
    if max_norm <= 0.0:
        return _ONE
    sq = 0.0
    for j in range(grads.shape[1]):
        sq += np.float64(grads[i, j]) ** 2
    norm = math.sqrt(sq)
    if norm > max_norm:
        return np.float32(max_norm / (norm + 1e-6))
    return _ONE


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=True, cache=True)
def sgd_update(weights, momentum_buf, slots, grads, lr, weight_decay, max_norm,
               momentum, dampening, nesterov):
    """SGD with optional (lazy) momentum, as torch.optim.SGD on the touched rows."""
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        r = slots[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            g = grads[i, j] * scale + weight_decay * weights[r, j]
            if momentum != 0.0:
                buf = momentum * momentum_buf[r, j] + (_ONE - dampening) * g
                momentum_buf[r, j] = buf
                g = g + momentum * buf if nesterov else buf
            weights[r, j] -= lr * g


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=True, cache=True)
def adagrad_update(weights, sum_sq, slots, grads, clr, weight_decay, max_norm, eps):
    """Element-wise Adagrad, as torch.optim.Adagrad: ``w -= clr * g / (sqrt(G) + eps)``."""
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        r = slots[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            g = grads[i, j] * scale + weight_decay * weights[r, j]
            s = sum_sq[r, j] + g * g
            sum_sq[r, j] = s
            weights[r, j] -= clr * g / (np.sqrt(s) + eps)


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=True, cache=True)
def rowwise_adagrad_update(weights, row_sum, slots, grads, lr, weight_decay, max_norm, eps):
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row."""
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        r = slots[i]
        scale = _clip_scale(grads, i, max_norm)
        sq = np.float32(0.0)
        for j in range(dim):
            g = grads[i, j] * scale + weight_decay * weights[r, j]
            sq += g * g
        s = row_sum[r, 0] + sq / np.float32(dim)
        row_sum[r, 0] = s
        step = lr / (np.sqrt(s) + eps)
        for j in range(dim):
            g = grads[i, j] * scale + weight_decay * weights[r, j]
            weights[r, j] -= step * g


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=True, cache=True)
def adam_update(weights, moments, slots, grads, step_size, weight_decay, max_norm,
                beta1, beta2, eps):
    """Lazy Adam, as torch.optim.SparseAdam: only touched rows move, one global step.

    ``moments[:, :dim]`` is the first moment and ``moments[:, dim:]`` the second;
    ``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``.
    """
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        r = slots[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            g = grads[i, j] * scale + weight_decay * weights[r, j]
            m = moments[r, j] + (g - moments[r, j]) * (_ONE - beta1)
            v = moments[r, dim + j] + (g * g - moments[r, dim + j]) * (_ONE - beta2)
            moments[r, j] = m
            moments[r, dim + j] = v
            weights[r, j] -= step_size * m / (np.sqrt(v) + eps)


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, cache=True)
def ftrl_update(weights, zn, slots, grads, alpha, weight_decay, max_norm, beta, l1, l2):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate.

    ``zn[:, :dim]`` holds z and ``zn[:, dim:]`` holds n (the sum of squared gradients).
    """
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        r = slots[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            w = np.float64(weights[r, j])
            g = grads[i, j] * scale + weight_decay * w
            n_old = zn[r, dim + j]
            n_new = n_old + g * g
            sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / alpha
            z = zn[r, j] + g - sigma * w
            zn[r, j] = z
            zn[r, dim + j] = n_new
            if abs(z) <= l1:
                weights[r, j] = 0.0
            else:
                sign = 1.0 if z > 0 else -1.0
                weights[r, j] = -(z - sign * l1) / ((beta + math.sqrt(n_new)) / alpha + l2)


@adaptive(lambda grads: grads.size)
@nb.njit(parallel=True, cache=True)
def nonfinite_rows(grads):
    """(n,) bool: whether row i of ``grads`` (n, dim) holds a NaN or an inf."""
    n = grads.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    for i in nb.prange(n):
        for j in range(grads.shape[1]):
            if not math.isfinite(grads[i, j]):
                out[i] = True
                break
    return out
