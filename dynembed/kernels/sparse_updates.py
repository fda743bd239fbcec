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

from dynembed.kernels._llvm import FAST
from dynembed.kernels._prefetch import PREFETCH_DISTANCE, prefetch_row
from dynembed.kernels._threads import adaptive

_ONE = np.float32(1.0)
_EXPONENT = np.uint32(0x7F800000)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_MAX_F32 = np.float32(_FLOAT32_MAX)


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


@nb.njit(inline="always", cache=True)
def _prefetch_ahead(weights, state, slots, i):
    # Rows are scattered over the arena: ask for a later row's weights and state now.
    k = i + PREFETCH_DISTANCE
    if k < slots.shape[0]:
        prefetch_row(weights, slots[k])
        if state.shape[1]:
            prefetch_row(state, slots[k])


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=FAST, cache=True)
def sgd_update(weights, momentum_buf, slots, grads, lr, weight_decay, max_norm,
               momentum, one_minus_dampening, nesterov):
    """SGD with optional (lazy) momentum, as torch.optim.SGD on the touched rows.

    With dampening, ``momentum_buf`` has one more column than the weights: 0 until the row's
    first update, which (as torch's first step) sets the buffer to the gradient undamped.
    Without dampening a zero buffer gives the same first step, so no column is needed.
    """
    # Inner loops run over 1-D row views: contiguous, so LLVM vectorises them.
    dim = weights.shape[1]
    tracked = momentum_buf.shape[1] > dim
    for i in nb.prange(slots.shape[0]):
        _prefetch_ahead(weights, momentum_buf, slots, i)
        w = weights[slots[i]]
        g_row = grads[i]
        scale = _clip_scale(grads, i, max_norm)
        if momentum != 0.0:
            buf = momentum_buf[slots[i]]
            damp = one_minus_dampening
            if tracked:
                if buf[dim] == 0.0:
                    damp = _ONE
                buf[dim] = _ONE
            for j in range(dim):
                g = g_row[j] * scale + weight_decay * w[j]
                b = momentum * buf[j] + damp * g
                buf[j] = b
                w[j] -= lr * (g + momentum * b if nesterov else b)
        else:
            for j in range(dim):
                w[j] -= lr * (g_row[j] * scale + weight_decay * w[j])


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=FAST, cache=True)
def adagrad_update(weights, sum_sq, slots, grads, clr, weight_decay, max_norm, eps):
    """Element-wise Adagrad, as torch.optim.Adagrad: ``w -= clr * g / (sqrt(G) + eps)``."""
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        _prefetch_ahead(weights, sum_sq, slots, i)
        w = weights[slots[i]]
        acc = sum_sq[slots[i]]
        g_row = grads[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            g = g_row[j] * scale + weight_decay * w[j]
            a = acc[j] + g * g
            acc[j] = a
            w[j] -= clr * g / (np.sqrt(a) + eps)


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=FAST, cache=True)
def rowwise_adagrad_update(weights, row_sum, slots, grads, lr, weight_decay, max_norm, eps):
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row."""
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        _prefetch_ahead(weights, row_sum, slots, i)
        r = slots[i]
        w = weights[r]
        g_row = grads[i]
        scale = _clip_scale(grads, i, max_norm)
        sq = np.float32(0.0)
        for j in range(dim):
            g = g_row[j] * scale + weight_decay * w[j]
            sq += g * g
        s = row_sum[r, 0] + sq / np.float32(dim)
        row_sum[r, 0] = s
        step = lr / (np.sqrt(s) + eps)
        for j in range(dim):
            w[j] -= step * (g_row[j] * scale + weight_decay * w[j])


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, fastmath=FAST, cache=True)
def adam_update(weights, moments, slots, grads, step_size, weight_decay, keep, max_norm,
                one_minus_beta1, one_minus_beta2, eps):
    """Lazy Adam, as torch.optim.SparseAdam: only touched rows move, one global step.

    ``moments[:, :dim]`` is the first moment and ``moments[:, dim:]`` the second;
    ``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``. ``weight_decay`` is the L2
    penalty added to the gradient and ``keep`` the factor each row is multiplied by before
    its step (``1 - lr * weight_decay`` for AdamW's decoupled decay, else 1, which leaves
    every weight exact). ``1 - beta`` come computed in float64 (as torch's
    ``alpha=1 - beta``): float32's 1 - float32(0.99999) is 7e-4 off.

    A second moment that overflowed to inf (a finite gradient above 1.8e19: the row is
    left as it was, as torch does) is read as float32's largest value: SparseAdam's
    ``v + (g * g - v) * (1 - beta2)`` is inf - inf = NaN on the row's next update, which
    made the row NaN, uncounted; capped, it decays as it would from a huge finite value.
    """
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        _prefetch_ahead(weights, moments, slots, i)
        w = weights[slots[i]]
        mv = moments[slots[i]]
        g_row = grads[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            g = g_row[j] * scale + weight_decay * w[j]
            m = mv[j] + (g - mv[j]) * one_minus_beta1
            v_old = min(mv[dim + j], _FLOAT32_MAX_F32)
            v = v_old + (g * g - v_old) * one_minus_beta2
            mv[j] = m
            mv[dim + j] = v
            w[j] = w[j] * keep - step_size * m / (np.sqrt(v) + eps)


@adaptive(lambda weights, state, slots, grads, *rest: grads.size)
@nb.njit(parallel=True, cache=True)
def ftrl_update(weights, zn, slots, grads, alpha, weight_decay, max_norm, beta, l1, l2):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate.

    ``zn[:, :dim]`` holds z and ``zn[:, dim:]`` holds n (the sum of squared gradients).
    """
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        _prefetch_ahead(weights, zn, slots, i)
        w_row = weights[slots[i]]
        st = zn[slots[i]]
        g_row = grads[i]
        scale = _clip_scale(grads, i, max_norm)
        for j in range(dim):
            w = np.float64(w_row[j])
            g = g_row[j] * scale + weight_decay * w
            # n is stored in float32: capped at its largest value, so one huge (finite)
            # gradient does not make n inf and every later sigma inf - inf = NaN
            n_old = min(np.float64(st[dim + j]), _FLOAT32_MAX)
            n_new = min(n_old + g * g, _FLOAT32_MAX)
            sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / alpha
            # z is stored in float32 too: kept within its range for the same reason
            z = min(max(st[j] + g - sigma * w, -_FLOAT32_MAX), _FLOAT32_MAX)
            st[j] = z
            st[dim + j] = n_new
            if abs(z) <= l1:
                w_row[j] = 0.0
            else:
                sign = 1.0 if z > 0 else -1.0
                w_row[j] = -(z - sign * l1) / ((beta + math.sqrt(n_new)) / alpha + l2)


@adaptive(lambda grads: grads.size)
@nb.njit(parallel=True, cache=True)
def nonfinite_rows(grads):
    """(n,) bool: whether row i of ``grads`` (n, dim) float32 holds a NaN or an inf.

    Tests the exponent bits (all ones for NaN and inf) with integer ops, which vectorise;
    a float test with an early exit does not.
    """
    n = grads.shape[0]
    bits = grads.view(np.uint32)
    out = np.empty(n, dtype=np.bool_)
    for i in nb.prange(n):
        row = bits[i]
        bad = np.uint32(0)
        for j in range(row.shape[0]):
            bad |= np.uint32((row[j] & _EXPONENT) == _EXPONENT)
        out[i] = bad != 0
    return out
