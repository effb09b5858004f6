"""Non-finite scores, shared by the exact, local and routing tests (issue 18, defect 2).

With ``check_finite=False`` a NaN input must give NaN rows, as NumPy does, never
zeros; a row that scores ``+inf`` against one key must return that key's value
(the limit of a growing score), and against several keys their mean. Expected
values are written by hand from the inputs below (scale 1).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from eff_attn.testing import assert_close, to_host
from tests._oracles import dense_attention

# Keys chosen so that q = (inf, 0) scores exactly +inf against keys 1 and 2 and -inf
# against keys 0 and 3 (no inf * 0 products).
K = np.array([[-1.0, 1.0], [1.0, 2.0], [1.0, 0.0], [-1.0, -1.0]])         # (4, 2)
V = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])           # (4, 2)
FINITE_Q = np.array([0.5, 0.2])


@contextlib.contextmanager
def _expected_fp_warnings():
    """The inputs overflow or hold NaN on purpose: the values are checked, not the warnings."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _run(case, *args, **kw):
    """``case.run(...)`` on the host."""
    with _expected_fp_warnings():
        return to_host(case.run(*args, **kw))


def check_nan_input_gives_nan_rows(case, **kw):
    """A NaN in a query makes its row NaN, other rows stay finite; a NaN key makes every row NaN."""
    q = np.array([FINITE_Q, [np.nan, 0.0], FINITE_Q])                       # (3, 2)
    out = _run(case, q, K, V, scale=1.0, check_finite=False, **kw)
    assert np.isnan(out[1]).all(), f"row with a NaN query gave {out[1]}"
    ref, _ = dense_attention(FINITE_Q[None], K, V, True, scale=1.0)
    assert_close(out[[0, 2]], np.vstack([ref, ref]), rel=1e-12)
    k = K.copy()
    k[3, 0] = np.nan
    out = _run(case, q, k, V, scale=1.0, check_finite=False, **kw)
    assert np.isnan(out).all(), f"a NaN key left finite rows: {out}"


def check_plus_inf_score_returns_that_keys_value(case, **kw):
    """Score +inf against one key gives its value; against two keys, their mean."""
    k = K.copy()
    k[1] = [-1.0, 1.0]                                                      # now only key 2 scores +inf
    q = np.array([[np.inf, 0.0], FINITE_Q])                                 # (2, 2)
    out = _run(case, q, k, V, scale=1.0, check_finite=False, **kw)
    ref, _ = dense_attention(FINITE_Q[None], k, V, True, scale=1.0)
    assert_close(out, np.vstack([V[2], ref]), rel=1e-12)
    out = _run(case, q, K, V, scale=1.0, check_finite=False, **kw)       # keys 1 and 2 tie at +inf
    assert_close(out[0], (V[1] + V[2]) / 2, rel=1e-12)


def check_float32_overflow_to_plus_inf_returns_that_keys_value(case, **kw):
    """Finite float32 inputs whose score overflows to +inf: the output is that key's finite value."""
    q = np.array([[3e19, 0.0]], dtype=np.float32)                           # q . k0 = 9e38 > float32 max
    k = np.array([[3e19, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    v = V[:3].astype(np.float32)
    out = _run(case, q, k, v, scale=1.0, **kw)
    assert_close(out, v[:1], rel=1e-7)
