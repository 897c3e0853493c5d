"""Comparing images computed along two different float paths (the command vs the test's recomputation).

Two float32 computations of the same image that differ only in summation order (another CPU's SIMD width, another
thread count, another batch split) agree to round-off, not bit for bit: a value that lands within that round-off
of a rounding boundary k + 0.5 may quantise to k on one machine and k + 1 on another. So the tests compare
  * the float images before quantisation (grey levels, [0, 255]) to a tolerance TOL, and
  * the uint8 images to the float reference: every value within 0.5 + TOL of it (a +-1 only where the reference
    sits within TOL of a boundary), and at most MAX_FRAC of the values differing from round(reference).
Bitwise equality stays for the same code on the same inputs (resume, determinism, byte-identical files).

TOL = 0.01 grey level = 7.8e-5 in [-1, 1] image units. float32's unit round-off is 2^-24 = 6e-8; a dot product of
length n rounds to within ~n u (worst case), so the tiny networks here (sums of <= 600 terms per layer, <= ~30
layers, a few sampler steps) stay near 1e-6 relative to their activations: 1e-4 grey level, measured 1e-6..3e-4
(comment in each test). TOL is ~30x the largest measured gap and still 50x below one grey level: a wrong noise seed,
label, prompt, rounding or de-normalisation moves pixels by whole grey levels, and fails.
MAX_FRAC = 1 %: with TOL = 0.01 at most ~2 % of non-saturated values lie within TOL of a boundary (uniform
fractional parts), and only those whose two paths straddle it differ; measured 0-0.03 %.
"""
import numpy as np

TOL = 0.01                 # grey levels
MAX_FRAC = 0.01


def grey(x_pm1):
    """Pre-rounding grey levels of an image in [-1, 1] (float64 numpy): (clamp(x, -1, 1) + 1) * 127.5."""
    x = np.asarray(x_pm1, dtype=np.float64)
    return (np.clip(x, -1, 1) + 1) * 127.5


def assert_float_close(got, ref, tol=TOL, what="image"):
    """Float images in grey levels (before quantisation): max |got - ref| <= tol. Returns the max gap."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    gap = float(np.abs(got - ref).max()) if got.size else 0.0
    assert gap <= tol, f"{what}: float images differ by {gap:.3g} grey levels > {tol} (round-off bound)"
    return gap


def assert_quantised(got_uint8, ref_grey, tol=TOL, max_frac=MAX_FRAC, what="image"):
    """uint8 values against the float reference (grey levels, before rounding): each within 0.5 + tol of it, and at
    most max_frac of them different from round(ref). Returns the fraction that differ."""
    got, ref = np.asarray(got_uint8).astype(np.float64), np.asarray(ref_grey, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    worst = float(np.abs(got - ref).max()) if got.size else 0.0
    assert worst <= 0.5 + tol, f"{what}: a uint8 value is {worst:.3f} grey levels from the float reference " \
                               f"(> 0.5 + {tol}: not a rounding of it)"
    frac = float((got != np.round(ref)).mean()) if got.size else 0.0
    assert frac <= max_frac, f"{what}: {frac:.2%} of the values differ from round(reference) (> {max_frac:.0%})"
    return frac
