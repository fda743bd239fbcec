"""Initializers: distributions as defined, deterministic per (seed, key)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import dynembed as de

N = 20_000


def _init(initializer, dim=8, seed=0, ids=None):
    table = de.DynamicTable(de.TableConfig(dim=dim, initializer=initializer, seed=seed))
    ids = torch.arange(N) if ids is None else ids
    return table.find_or_insert(ids).values.numpy().astype(np.float64)


def test_zeros_and_constant():
    assert np.all(_init(de.init.Zeros()) == 0)
    assert np.all(_init(de.init.Constant(value=0.25)) == 0.25)


def test_uniform_bounds_and_moments():
    v = _init(de.init.Uniform(low=-0.5, high=1.5))
    assert v.min() >= -0.5 and v.max() < 1.5
    assert abs(v.mean() - 0.5) < 0.01
    assert abs(v.var() - 4 / 12) < 0.01
    d = _init(de.init.Uniform(), dim=16)
    assert np.abs(d).max() <= 0.25 and d.max() > 0.24


def test_uniform_never_reaches_high():
    """Drawn in float64 and rounded to float32, a value could land on high: half of them
    with bounds one float32 step apart, and key 473344 of seed 1 at [0, 1)."""
    high = 1.0 + 2**-23
    v = _init(de.init.Uniform(low=1.0, high=high), seed=1)
    assert (v == 1.0).all()
    row = _init(de.init.Uniform(low=0.0, high=1.0), dim=64, seed=1,
                ids=torch.tensor([473344]))
    assert row.max() < 1.0 and row[0, 22] == np.float32(1.0 - 2**-24)
    with pytest.raises(ValueError, match="no float32 value lies in"):
        _init(de.init.Uniform(low=1.0, high=1.0 + 2**-30))


def test_normal_moments():
    v = _init(de.init.Normal(mean=1.0, std=2.0))
    assert abs(v.mean() - 1.0) < 0.03 and abs(v.std() - 2.0) < 0.03
    # Normality: about 95.4% within 2 std.
    assert abs(np.mean(np.abs(v - 1.0) < 4.0) - 0.9545) < 0.005


def test_truncated_normal_stays_in_bounds_with_the_right_spread():
    v = _init(de.init.TruncatedNormal(mean=0.0, std=1.0, a=-1.0, b=2.0))
    assert v.min() >= -1.0 and v.max() <= 2.0
    # Mean of N(0,1) truncated to [-1, 2]: (phi(-1) - phi(2)) / (Phi(2) - Phi(-1)) = 0.2288
    assert abs(v.mean() - 0.2288) < 0.02


@pytest.mark.parametrize("a, b", [(2.5, 3.0), (-3.0, -2.5), (6.0, 6.5), (-0.01, 0.01)])
def test_truncated_normal_in_narrow_or_tail_windows_has_the_truncated_moments(a, b):
    """Windows that rejection sampling rarely hits: once clamped to the bound (73% of the
    draws sat on a=2.5), now drawn by the inverse CDF where rejection gives up."""
    v = _init(de.init.TruncatedNormal(mean=0.0, std=1.0, a=a, b=b), dim=16)
    assert v.min() >= a and v.max() <= b
    assert np.mean((v == np.float32(a)) | (v == np.float32(b))) < 1e-3
    normal = torch.distributions.Normal(0.0, 1.0)
    pdf = [float(normal.log_prob(torch.tensor(x, dtype=torch.float64)).exp()) for x in (a, b)]
    mass = float(normal.cdf(torch.tensor(b, dtype=torch.float64))
                 - normal.cdf(torch.tensor(a, dtype=torch.float64)))
    mean = (pdf[0] - pdf[1]) / mass
    var = 1 + (a * pdf[0] - b * pdf[1]) / mass - mean ** 2
    assert abs(v.mean() - mean) < 0.01 * (b - a) and abs(v.var() / var - 1) < 0.05


def test_same_seed_and_key_give_same_vector_regardless_of_batch():
    ids = torch.tensor([5, -9, 2**62])
    a = _init(de.init.Normal(), ids=ids, seed=11)
    b = _init(de.init.Normal(), ids=torch.tensor([2**62, 0, 5, 77, -9]), seed=11)
    assert np.array_equal(a[0], b[2]) and np.array_equal(a[1], b[4]) and np.array_equal(a[2], b[0])
    c = _init(de.init.Normal(), ids=ids, seed=12)
    assert not np.array_equal(a, c)


def test_same_vector_in_another_process():
    code = ("import dynembed as de, torch;"
            "t = de.DynamicTable(de.TableConfig(dim=4, seed=3, initializer=de.init.Normal()));"
            "print(t.find_or_insert(['cat', 'dog']).values.numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    here = de.DynamicTable(de.TableConfig(dim=4, seed=3, initializer=de.init.Normal()))
    assert out == here.find_or_insert(["cat", "dog"]).values.numpy().tobytes().hex()


def test_seed_none_draws_from_torch_generator():
    torch.manual_seed(123)
    a = de.DynamicTable(de.TableConfig(dim=4)).find_or_insert([1]).values
    torch.manual_seed(123)
    b = de.DynamicTable(de.TableConfig(dim=4)).find_or_insert([1]).values
    assert torch.equal(a, b)


@pytest.mark.parametrize("make, match", [
    (lambda: de.init.Uniform(low=1.0, high=0.0), "low"),
    (lambda: de.init.Normal(std=0.0), "std"),
    (lambda: de.init.Normal(std=float("inf")), "std"),
    (lambda: de.init.TruncatedNormal(mean=True), "mean"),
    (lambda: de.init.TruncatedNormal(a=1.0, b=-1.0), "a must be"),
    (lambda: de.init.Constant(value=float("inf")), "value"),
    (lambda: de.init.TruncatedNormal(a=38.0, b=39.0), "beyond 35 standard deviations"),
    (lambda: de.init.TruncatedNormal(a=-41.0, b=-40.0), "beyond 35 standard deviations"),
    # a bound left to its 1/sqrt(dim) default is checked when the table is configured
    (lambda: de.TableConfig(dim=4, initializer=de.init.Uniform(low=1.0)),
     r"at dim=4: low must be < high, got low=1.0, high=0.5"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("a, b", [(33.0, 36.0), (-36.0, -34.0), (-60.0, 1.0)])
def test_truncated_normal_cuts_past_35_std_move_to_it(a, b):
    """The sampler's quantiles overflow near 38 std (NaN rows once): cuts beyond 35 are
    moved to 35, where the mass beyond is negligible."""
    t = de.DynamicTable(de.TableConfig(
        dim=8, seed=1, initializer=de.init.TruncatedNormal(std=1.0, a=a, b=b)))
    v = t.find_or_insert(np.arange(500)).values.numpy()
    assert np.isfinite(v).all()
    assert v.min() >= max(a, -35.0) and v.max() <= min(b, 35.0)


@pytest.mark.parametrize("mean, std, a, b", [(0.1, 0.3, 6.0, 6.0001), (0.1, 0.3, -1e-5, 1e-5)])
def test_truncated_normal_stays_in_bounds_after_rounding_to_float32(mean, std, a, b):
    """Drawn in float64 inside [mean + a*std, mean + b*std] and rounded to float32, values
    of a window whose bounds are no float32 numbers landed outside it (0.3% of them)."""
    v = _init(de.init.TruncatedNormal(mean=mean, std=std, a=a, b=b), dim=16)
    assert v.min() >= mean + a * std and v.max() <= mean + b * std


@pytest.mark.parametrize("make, match", [
    (lambda: de.init.Constant(value=1e300), "value"),
    (lambda: de.init.Normal(mean=-1e39), "mean"),
    (lambda: de.init.Normal(std=1e300), "std"),
    (lambda: de.init.Uniform(low=-1e308, high=0.0), "low"),
    (lambda: de.init.Uniform(low=0.0, high=1e39), "high"),
])
def test_parameters_beyond_float32_are_refused(make, match):
    """Rows are float32: Constant(value=1e300) or Normal(mean=1e300) filled every new row
    with inf, and Uniform(low=-1e308, high=1e308) gave every element 3.4e38."""
    with pytest.raises(ValueError, match=rf"{match} must be .*float32"):
        make()


def test_a_window_holding_no_float32_value_is_refused():
    with pytest.raises(ValueError, match="no float32 value lies in"):
        de.TableConfig(dim=4, initializer=de.init.TruncatedNormal(mean=1.0, std=1e-9,
                                                                  a=0.1, b=0.2))


def test_uniform_never_falls_below_a_low_that_is_no_float32_number():
    """float32(0.7) < 0.7, but numpy compared them in float32 (equal), so the bound was not
    moved up and 0.4% of the values of Uniform(low=0.7, high=0.70001) fell below low."""
    v = _init(de.init.Uniform(low=0.7, high=0.70001), dim=16)
    assert v.min() >= 0.7 and v.max() < 0.70001
