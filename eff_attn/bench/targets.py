"""What each method is judged against in ``eff-attn compare``.

Most methods approximate softmax attention, so their target is float64 exact
(softmax) attention. Some compute a different model on purpose:

- ``entmax`` and ``sparsefinder`` compute alpha-entmax attention; their
  target is dense entmax at the same alpha (float64). Against softmax they
  look broken (errors above 1) while being exact at their own job.
- ``yoso`` samples YOSO-E, the expectation of its collision kernel
  (``variant="expectation"`` at the same ``tau``, damping and output
  normalisation); YOSO-E is itself a model, not softmax.

Every row also keeps its error against softmax, so the two can be read side
by side.

The float64 targets come from the NumPy references (:func:`target_backend`):
the oracles of the tests, which share no code with the kernels under test.
Above :data:`REFERENCE_MAX_ENTRIES` (the entmax and YOSO-E references hold
dense ``(heads, Nq, Nk)`` arrays) they come from the Numba kernels in
float64, which also agree with the references to 1e-12 in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Target", "SOFTMAX", "target_of", "target_backend", "REFERENCE_MAX_ENTRIES"]

#: Largest ``heads * Nq * Nk`` whose targets the NumPy references compute (2**25: the default
#: problem, 8 heads at N = 2048; 256 MiB per dense float64 array).
REFERENCE_MAX_ENTRIES = 2**25


def target_backend(heads: int, Nq: int, Nk: int) -> str:
    """Where the float64 targets of a ``(heads, Nq, Nk)`` problem are computed: ``"numpy"`` or ``"numba"``."""
    from .. import _backend

    if heads * Nq * Nk <= REFERENCE_MAX_ENTRIES or not _backend.available("numba")[0]:
        return "numpy"
    return "numba"


@dataclass(frozen=True)
class Target:
    """A reference output: ``method`` called with ``params`` in float64."""

    label: str
    method: str
    params: tuple = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.params)


SOFTMAX = Target("softmax", "exact", (("algorithm", "blocked"),))


def _entmax(alpha) -> Target:
    if np.ndim(alpha) != 0:                                   # one alpha per slice: no single label
        return Target("entmax", "entmax", (("alpha", np.asarray(alpha)),))
    return Target(f"entmax {float(alpha):g}", "entmax", (("alpha", float(alpha)),))


def target_of(method: str, params: dict) -> Target:
    """The target of ``method`` called with resolved ``params`` (see the module docstring)."""
    if method in ("entmax", "sparsefinder"):
        return _entmax(params["alpha"])
    if method == "yoso":
        return Target("YOSO-E", "yoso", (("variant", "expectation"), ("tau", int(params["tau"])),
                                         ("damping", float(params.get("damping", 1.0))),
                                         ("normalize_output", bool(params.get("normalize_output", True)))))
    return SOFTMAX
