"""Methods, their backend implementations and what each can do.

A *method* (``exact``, ``yoso``, ...) is described once by a :class:`Method`
record in its folder's ``__init__.py``: how to resolve its parameters, how to
draw its randomness on the host (from the shapes alone) and fit its
data-dependent state (from the values of the inputs), its analytic FLOP count,
and one :class:`Impl` per backend. The registry maps method names to those
records and imports them lazily, so ``import eff_attn`` never imports Numba or
CuPy.

Adding a method means adding its folder and one line to :data:`METHOD_MODULES`.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _backend
from .random import as_generator

__all__ = [
    "Impl",
    "Method",
    "Sharding",
    "NotSupportedError",
    "METHOD_MODULES",
    "method_names",
    "get_method",
    "register",
    "unregister",
    "not_supported_reasons",
    "scalar_params",
]


class NotSupportedError(ValueError):
    """A valid option that a method or backend cannot honour.

    Raised, for example, for ``causal=True`` with a method that has no causal
    form, or for ``backend="cupy"`` on a machine without a GPU. The message
    lists every candidate implementation and why it was refused.
    """


#: Method name -> ``"module:attribute"`` of its :class:`Method` record.
#: One line per method; a folder may hold several methods (treeformer).
METHOD_MODULES: dict[str, str] = {
    "exact": "eff_attn.methods.exact:METHOD",
    "uniform": "eff_attn.methods.uniform:METHOD",
    "topk_oracle": "eff_attn.methods.topk_oracle:METHOD",
    "yoso": "eff_attn.methods.yoso:METHOD",
    "kdeformer": "eff_attn.methods.kdeformer:METHOD",
    "local": "eff_attn.methods.local:METHOD",
    "performer": "eff_attn.methods.performer:METHOD",
    "routing": "eff_attn.methods.routing:METHOD",
    "nystrom": "eff_attn.methods.nystrom:METHOD",
    "reformer": "eff_attn.methods.reformer:METHOD",
    "treeformer_tf": "eff_attn.methods.treeformer:TF_METHOD",
    "treeformer_tc": "eff_attn.methods.treeformer:TC_METHOD",
    "entmax": "eff_attn.methods.entmax:METHOD",
    "sparsefinder": "eff_attn.methods.sparsefinder:METHOD",
}

#: Backends, in the order ``backend="auto"`` prefers them for host arrays.
BACKENDS = ("numpy", "numba", "cupy")


@dataclass(frozen=True)
class Impl:
    """One method on one backend, with its declared capabilities.

    Parameters
    ----------
    backend : {"numpy", "numba", "cupy"}
    module : str or module-like object
        Dotted module path holding ``forward`` (and ``backward`` when
        ``differentiable``), imported only when the implementation runs; or
        any object with those attributes (for methods defined at run time).
    dtypes : tuple of str, default=("float32", "float64")
    supports_mask, supports_causal, differentiable : bool
    check : callable, optional
        ``check(problem, params) -> list[str]`` with extra reasons this
        implementation cannot run these inputs (e.g. an algorithm it lacks).
    """

    backend: str
    module: object
    dtypes: tuple[str, ...] = ("float32", "float64")
    supports_mask: bool = True
    supports_causal: bool = True
    differentiable: bool = True
    check: Callable[[Any, dict], list[str]] | None = None

    @property
    def device(self) -> str:
        """``"gpu"`` for CuPy, ``"cpu"`` otherwise."""
        return "gpu" if self.backend == "cupy" else "cpu"

    def load(self):
        """Import and return the backend module."""
        if isinstance(self.module, str):
            return importlib.import_module(self.module)
        return self.module


#: Roles a :class:`Sharding` declaration gives to the leading axes of an array:
#: the flattened (batch, head) axis ``G`` and the query axis ``Nq``.
SHARD_ROLES = ("slice", "query", None)


@dataclass(frozen=True)
class Sharding:
    """How :mod:`eff_attn.dist` may split one call of a method into tasks.

    ``eff_attn.dist`` resolves the parameters and draws the randomness once,
    for the whole problem, so that a distributed call equals the
    single-machine call at the same seed; then each task receives its part.
    This record says what a part is. A method without one (``None``) runs
    as one task, correct but not parallel. See CONTRIBUTING.md,
    "Distributed execution".

    The backend contract already makes the (batch, head) slices independent:
    slice ``g`` of the output depends only on slice ``g`` of the inputs and
    on the ``g``-th entries of the per-slice arrays named in ``split``.

    Parameters
    ----------
    split : dict, default={}
        Entries of the resolved parameters or of the draw (by keyword) that
        hold per-slice or per-query data: ``name -> axes``, a tuple giving
        the role of the array's leading axes in order, ``"slice"`` (the
        flattened ``G`` axis; a length-1 axis is shared by every slice),
        ``"query"`` (the ``Nq`` axis) or ``None`` (kept whole). A tuple or
        list value has each element split alike. For an object, give a
        callable ``split(value, part) -> value`` instead, where
        ``part.slices`` (int64, C-order indices into ``G``) and
        ``part.queries`` (a ``slice``) say what the task holds.
    shared : tuple of str, default=()
        Entries every task receives whole: a learned state, a draw shared by
        all slices. An array or object entry named in neither ``split`` nor
        ``shared`` is refused with :class:`NotSupportedError`; plain values
        (None, bool, numbers, str and tuples of them) are always shared.
    reads_data : bool or callable, default=True
        Whether ``resolve`` reads the values of q, k, v or mask (not only
        their shapes). Then the call is prepared (resolved, drawn and fitted)
        in one task that sees the whole inputs (correct, but that task
        gathers them). A callable ``reads_data(problem, params) -> bool``
        gets the call's :class:`~eff_attn._validate.Problem` (shapes,
        ``causal``, ``scale``; its arrays hold no data) and the user's method
        parameters. ``draw`` never reads the data (see :class:`Method`), and
        a call whose :meth:`Method.fits` is true runs in that one task
        whatever this says, so a method whose ``resolve`` reads only shapes
        gives ``False`` here even when it fits a state to the data.
    queries : bool or callable, default=False
        Each output row depends only on its own query, all keys and the
        resolved/drawn entries, so the query axis may be split (a task gets
        the causal offset of its query block). A callable as for
        ``reads_data``.
    key_blocks : callable, optional
        For an output that is a normalised positive weighting of the values,
        ``out_i = sum_j w_ij v_j / sum_j w_ij`` (softmax, uniform):
        ``key_blocks(problem, params, res) -> (G, Nq)``, the log of
        ``sum_j w_ij`` over the task's keys (``-inf`` for a row that sees
        none), from the backend's residuals ``res``. The key axis may then
        be split into blocks, merged exactly by the online-softmax merge.
    """

    split: dict = field(default_factory=dict)
    shared: tuple = ()
    reads_data: bool | Callable[[Any, dict], bool] = True
    queries: bool | Callable[[Any, dict], bool] = False
    key_blocks: Callable[[Any, dict, dict], Any] | None = None


@dataclass(frozen=True)
class Method:
    """Everything the dispatcher needs to know about one attention method.

    Parameters
    ----------
    name : str
    summary : str
        One line, shown by ``eff-attn compare`` and the docs.
    resolve : callable
        ``resolve(problem, **params) -> dict``: checks the user's parameters
        (``ValueError`` for a bad value) and fills in the defaults. Backends
        receive exactly this dict, so defaults are resolved in one place.
    flops : callable
        ``flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False,
        **params) -> int``, the analytic count of the method's docs page.
    impls : tuple of Impl
    draw : callable, optional
        ``draw(rng, problem, params) -> dict`` of host-side NumPy arrays
        (hyperplanes, features) or records, passed on to the backend as
        keyword arguments: the method's randomness, and what follows from
        the resolved parameters alone (a given state bound to the slices).
        It reads the shapes of ``problem`` (and ``causal``, ``scale``),
        never the values of q, k, v or mask, so :mod:`eff_attn.dist` runs
        it on the client. ``None`` when there is nothing to draw.
    fit : callable, optional
        ``fit(rng, problem, params) -> dict``: the state computed from the
        values of q, k, v and mask (k-means centroids, a fitted tree,
        learned projections), passed on to the backend like ``draw``'s
        entries, which it overrides. It runs after ``draw``, only when
        :meth:`fits` is true, and ``params`` holds the resolved parameters
        and the drawn entries. It may use ``rng`` too (k-means++ seeding,
        the queries it fits on); an integer seed is then turned into one
        Generator that ``draw`` uses first and ``fit`` continues.
    fit_when : callable, optional
        ``fit_when(problem, params) -> bool`` on the resolved parameters:
        whether ``fit`` runs for this call (say, only without a given
        state). ``None``: whenever ``fit`` is set.
    info : callable, optional
        ``info(problem, params, res) -> dict`` of method diagnostics built
        from the backend's residuals ``res``.
    finish : callable, optional
        ``finish(problem, params, out, res) -> dict``: the backend-independent
        tail of every forward (the FLOP count, the empty rows, statistics of
        the run), which completes the backend's residuals ``res``.
        ``params`` holds what the backend received (resolved and drawn).
        The API calls it after each forward, so that a backend never calls
        back into its method's package.
    budgets : tuple of dict, or callable
        The parameter sweep that ``eff-attn compare`` runs for this method,
        cheapest first. Each dict is a set of keyword arguments. A callable
        ``budgets(Nk) -> tuple of dict`` sizes the sweep to the number of
        keys (Treeformer's heights: leaves of 32 to 256 keys at any length);
        read it through :meth:`sweep`.
    budget_name : str
        The parameter the sweep varies, for table headers and plots.
    compare_defaults : dict
        What ``eff-attn compare --budget default`` passes, for a method
        that cannot run on its defaults alone (one that needs a fitted
        state, say); empty for the others.
    sharding : Sharding, optional
        How :mod:`eff_attn.dist` splits a call into tasks; ``None`` runs the
        whole call as one task.
    value_degree : int or callable, default=1
        ``d`` with ``out(q, k, c v) = c**d out(q, k, v)`` for ``c > 0``: 1
        for ``out = A(q, k) v``, 0 for an output normalised per row. A
        callable ``value_degree(params) -> int`` gets the resolved
        parameters. The API uses it to run on ``v / 2**e`` when ``max |v|``
        nears the dtype's range (see :func:`eff_attn._validate.value_rescale`).
    """

    name: str
    summary: str
    resolve: Callable[..., dict]
    flops: Callable[..., int]
    impls: tuple[Impl, ...]
    draw: Callable[..., dict] | None = None
    fit: Callable[..., dict] | None = None
    fit_when: Callable[[Any, dict], bool] | None = None
    info: Callable[..., dict] | None = None
    finish: Callable[..., dict] | None = None
    budgets: tuple[dict, ...] | Callable[[int], tuple[dict, ...]] = ({},)
    budget_name: str = ""
    compare_defaults: dict = field(default_factory=dict)
    sharding: Sharding | None = None
    value_degree: int | Callable[[dict], int] = 1

    @property
    def randomized(self) -> bool:
        """Whether the method takes ``rng``: it draws randomness or fits a state (which may use it)."""
        return self.draw is not None or self.fit is not None

    def fits(self, problem, params: dict) -> bool:
        """Whether this call runs :attr:`fit`, and so reads the values of the inputs.

        ``params`` are the resolved parameters.
        """
        return self.fit is not None and (self.fit_when is None or bool(self.fit_when(problem, params)))

    def draw_and_fit(self, rng, problem, params: dict) -> dict:
        """The backend's keyword arguments: ``params`` (resolved), then :attr:`draw`'s, then :attr:`fit`'s.

        When both run, an integer seed becomes one Generator, so that the
        fit continues the draw's stream. Anything else goes through as given,
        so that a method that never reads ``rng`` in this call ignores it,
        and one that does rejects what it cannot use.
        """
        fitting = self.fits(problem, params)
        if fitting and self.draw is not None and isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
            rng = as_generator(rng)
        kwargs = dict(params)
        if self.draw is not None:
            kwargs.update(self.draw(rng, problem, params))
        if fitting:
            kwargs.update(self.fit(rng, problem, kwargs))
        return kwargs

    def sweep(self, Nk: int) -> list[dict]:
        """The budget sweep at ``Nk`` keys (:attr:`budgets`), as fresh dicts."""
        budgets = self.budgets(Nk) if callable(self.budgets) else self.budgets
        return [dict(b) for b in budgets]

    def impl(self, backend: str) -> Impl | None:
        for impl in self.impls:
            if impl.backend == backend:
                return impl
        return None


_RUNTIME = "<registered at run time>"


def scalar_params(params: dict) -> dict:
    """The plain entries of ``params`` (None, bool, int, float, str, tuple): what ``info`` and ``flops`` take."""
    return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str, tuple))}


def method_names(builtin_only: bool = False) -> list[str]:
    """Names of every registered method, in registry order.

    ``builtin_only=True`` leaves out methods added with :func:`register`.
    """
    return [n for n, where in METHOD_MODULES.items() if not (builtin_only and where.startswith(_RUNTIME))]


_loaded: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """Return the :class:`Method` record for ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not a registered method; the message lists them all.
    """
    if not isinstance(name, str) or name not in METHOD_MODULES:
        known = ", ".join(METHOD_MODULES)
        raise ValueError(f"method={name!r} is not a known method; choose one of: {known}")
    if name not in _loaded:
        module, attr = METHOD_MODULES[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), attr)
    return _loaded[name]


def register(method: Method, *, replace: bool = False) -> Method:
    """Register a method defined outside the package (see the "adding a method" tutorial).

    Raises
    ------
    ValueError
        If the name is taken and ``replace`` is False.
    """
    if method.name in METHOD_MODULES and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
    METHOD_MODULES[method.name] = f"{_RUNTIME}:{method.name}"
    _loaded[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (built-in methods stay).

    Raises
    ------
    ValueError
        If ``name`` is built in or not registered.
    """
    if not METHOD_MODULES.get(name, "").startswith(_RUNTIME):
        raise ValueError(f"method {name!r} was not added with register(); only those can be removed")
    del METHOD_MODULES[name]
    _loaded.pop(name, None)


def not_supported_reasons(impl: Impl, problem, params: dict, *, need_grad: bool = False) -> list[str]:
    """Every reason ``impl`` cannot run ``problem`` with ``params``.

    An empty list means the implementation can run. The checks are, in
    order: the backend is installed and usable, the arrays live on its
    device, the dtype, mask, causal and gradient capabilities, and the
    implementation's own ``check``.
    """
    reasons = []
    available, why = _backend.available(impl.backend)
    if not available:
        reasons.append(why)
    if problem.device != impl.device and not _backend.emulating(impl.backend, problem):
        here = "CuPy (GPU)" if problem.device == "gpu" else "host (NumPy)"
        reasons.append(f"inputs are {here} arrays but this backend runs on the {impl.device}")
    if problem.dtype_name not in impl.dtypes:
        reasons.append(f"dtype {problem.dtype_name} is not supported (supports {', '.join(impl.dtypes)})")
    if problem.mask is not None and not impl.supports_mask:
        reasons.append("mask= is not supported")
    if problem.causal and not impl.supports_causal:
        reasons.append("causal=True is not supported")
    if need_grad and not impl.differentiable:
        reasons.append("has no backward pass")
    if impl.check is not None:
        reasons.extend(impl.check(problem, params))
    return reasons
