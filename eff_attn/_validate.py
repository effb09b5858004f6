"""Every input check of the package, in one place.

:func:`check_inputs` turns the user's ``q, k, v, mask, causal, scale`` into a
:class:`Problem`: flat C-contiguous ``(G, N, D)`` arrays on one device, with
the leading (batch, head) axes broadcast and remembered. The ``check_*``
helpers validate method parameters. Messages name the argument, what was
expected and what was given.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np

from . import interop
from .masks import causal_offset
from .registry import NotSupportedError

__all__ = [
    "Problem",
    "check_inputs",
    "check_int",
    "check_float",
    "check_choice",
    "check_bool",
    "check_array_shape",
    "flatten_leading",
    "check_memory",
    "memory_limit",
    "value_rescale",
]

_FLOAT_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Problem:
    """Validated attention inputs, flattened over the leading axes.

    Attributes
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
    v : array of shape (G, Nk, Dv)
    mask : bool array of shape (G, Nk), or None
    offset : int or None
        Causal offset (query ``i`` sits at position ``i + offset``); None if
        not causal.
    scale : float
    batch_shape : tuple of int
        The broadcast leading axes; ``G = prod(batch_shape)``.
    lead_shapes : dict
        The leading shape of each of q, k, v as given, to sum gradients
        over broadcast axes.
    framework : str
        Where the inputs came from (numpy, cupy, torch, jax).
    device : {"cpu", "gpu"}
    """

    q: object
    k: object
    v: object
    mask: object
    offset: int | None
    scale: float
    batch_shape: tuple
    lead_shapes: dict = field(repr=False)
    framework: str = "numpy"
    device: str = "cpu"

    @property
    def xp(self):
        return interop.array_module(self.q)

    @property
    def G(self) -> int:
        return self.q.shape[0]

    @property
    def Nq(self) -> int:
        return self.q.shape[1]

    @property
    def Nk(self) -> int:
        return self.k.shape[1]

    @property
    def D(self) -> int:
        return self.q.shape[2]

    @property
    def Dv(self) -> int:
        return self.v.shape[2]

    @property
    def causal(self) -> bool:
        return self.offset is not None

    @property
    def dtype_name(self) -> str:
        return str(self.q.dtype)

    def unflatten(self, x):
        """Reshape a leading ``G`` axis back to ``batch_shape``."""
        return x.reshape(*self.batch_shape, *x.shape[1:])

    def reduce_grad(self, dx, name: str):
        """Gradient of the flattened input ``name`` in the shape the user gave.

        Sums over the leading axes that were broadcast.
        """
        xp = interop.array_module(dx)
        dx = self.unflatten(dx)                                              # (*batch, N, D)
        lead = self.lead_shapes[name]
        extra = len(self.batch_shape) - len(lead)
        axes = tuple(range(extra)) + tuple(
            extra + i for i, n in enumerate(lead) if n == 1 and self.batch_shape[extra + i] != 1
        )
        if axes:
            dx = xp.sum(dx, axis=axes, keepdims=True)
            dx = dx.reshape(*lead, *dx.shape[-2:])
        return dx


def _describe(x) -> str:
    return f"{interop.framework_of(x)} array of shape {tuple(x.shape)} and dtype {x.dtype}"


def _floating_dtype(name: str, a) -> str:
    dtype = str(a.dtype)
    if dtype in _FLOAT_DTYPES:
        return dtype
    if dtype in ("float16", "bfloat16"):
        raise NotSupportedError(
            f"{name} has dtype {dtype}; eff_attn computes in float32 or float64. Cast it first, "
            f"e.g. {name}.astype(np.float32)."
        )
    raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dtype}")


def _first_bad(a):
    """Index of the first non-finite entry of ``a``, as a tuple (host)."""
    bad = np.argwhere(~np.isfinite(a.get() if hasattr(a, "get") else a))
    return tuple(int(i) for i in bad[0])


def _as_float(name: str, value) -> float:
    """``float(value)``; a real too large for a float (``10**400``) is a ValueError naming ``name``."""
    try:
        return float(value)
    except OverflowError:
        too_big = f"a number too large for a float ({type(value).__name__})"
        raise ValueError(f"{name} must be finite, got {too_big}") from None


def check_inputs(q, k, v, *, mask=None, causal=False, scale=None, check_finite=True) -> Problem:
    """Validate attention inputs and flatten them into a :class:`Problem`.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    mask : bool array of shape (..., Nk), optional
        Key keep-mask: True means the key may be attended.
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    check_finite : bool, default=True
        Raise on NaN or inf in q, and in the kept (unmasked) rows of k and v.
        With False, non-finite inputs propagate to the output. Masked rows of
        k and v never matter: non-finite values there are replaced by 0.

    Raises
    ------
    TypeError
        Not an array, mixed frameworks, a non-floating or mixed dtype, a
        non-boolean mask.
    ValueError
        Wrong rank, mismatched D or Nk, non-broadcastable leading axes, a mask
        of the wrong shape, non-finite inputs or scale.
    NotSupportedError
        float16/bfloat16 inputs.
    """
    check_finite = check_bool("check_finite", check_finite)
    named = {"q": q, "k": k, "v": v}
    arrays, frameworks, devices = {}, {}, {}
    for name, x in named.items():
        if x is None:
            raise TypeError(f"{name} is None; expected an array of shape (..., N, D)")
        arrays[name], frameworks[name], devices[name] = interop.to_kernel_array(x, name)
    if len(set(frameworks.values())) > 1 or len(set(devices.values())) > 1:
        where = ", ".join(f"{n} is {frameworks[n]} on {devices[n]}" for n in named)
        raise TypeError(f"q, k and v must come from one framework and device; {where}")
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    framework, device = frameworks["q"], devices["q"]

    for name, a in arrays.items():
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., N, D) with at least 2 axes, got shape {tuple(a.shape)}")
    dtypes = {name: _floating_dtype(name, a) for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"q, k and v must share one dtype; {given}")

    Nq, D = q.shape[-2:]
    Nk, Dk = k.shape[-2:]
    Nv, Dv = v.shape[-2:]
    if Dk != D:
        raise ValueError(f"k has D={Dk} features but q has D={D}; q is (..., Nq, D) and k is (..., Nk, D)")
    if Nv != Nk:
        raise ValueError(f"v has Nk={Nv} rows but k has Nk={Nk}; v must be (..., Nk, Dv)")
    for name, n in (("q", Nq), ("k", Nk)):
        if n < 1:
            raise ValueError(f"{name} has no rows (shape {tuple(arrays[name].shape)}); N must be at least 1")
    if D < 1 or Dv < 1:
        raise ValueError(f"feature sizes must be at least 1, got D={D}, Dv={Dv}")

    xp = interop.array_module(q)
    mask_arr = None
    lead = {name: tuple(a.shape[:-2]) for name, a in arrays.items()}
    shapes = list(lead.values())
    if mask is not None:
        mask_arr, mask_framework, _ = interop.to_kernel_array(mask, "mask")
        if mask_framework != framework:
            raise TypeError(f"mask is a {mask_framework} array but q, k, v are {framework}")
        if str(mask_arr.dtype) != "bool":
            raise TypeError(
                f"mask must be a boolean keep-mask of shape (..., Nk) (True = attend), got dtype {mask_arr.dtype}"
            )
        if mask_arr.ndim < 1 or mask_arr.shape[-1] != Nk:
            raise ValueError(f"mask must have shape (..., Nk) with Nk={Nk}, got shape {tuple(mask_arr.shape)}")
        shapes.append(tuple(mask_arr.shape[:-1]))
    try:
        batch_shape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        given = ", ".join(f"{n} {s}" for n, s in zip(("q", "k", "v", "mask"), shapes))
        raise ValueError(f"the leading (batch, head) axes do not broadcast: {given}") from None

    G = math.prod(batch_shape)

    def flat(a, tail):
        shape = (*batch_shape, *tail)
        if tuple(a.shape) != shape:  # broadcasting: materialise the repeats once
            a = xp.broadcast_to(a, shape).copy()
        return xp.ascontiguousarray(a).reshape(G, *tail)

    qf, kf, vf = flat(q, (Nq, D)), flat(k, (Nk, D)), flat(v, (Nk, Dv))
    maskf = None if mask_arr is None else flat(mask_arr, (Nk,))

    if check_finite and not bool(xp.isfinite(qf).all()):
        raise ValueError(f"q contains NaN or inf (first at q{_first_bad(q)}); pass check_finite=False to propagate")
    if check_finite or maskf is not None:
        kept = {}
        for name, a in (("k", kf), ("v", vf)):
            finite = xp.isfinite(a).all(axis=-1)                                  # (G, Nk)
            if maskf is not None and not bool((finite | maskf).all()):
                # Padding rows may hold anything; zero them with a where (never a
                # product, 0 * NaN = NaN) so that they cannot leak into any method.
                a = xp.where(maskf[..., None], a, 0).astype(a.dtype, copy=False)
                finite = finite | ~maskf
            if check_finite and not bool(finite.all()):
                raise ValueError(
                    f"{name} contains NaN or inf in a kept row (first at {name}{_first_bad(arrays[name])}); "
                    "mask it out or pass check_finite=False to propagate"
                )
            kept[name] = a
        kf, vf = kept["k"], kept["v"]

    offset = causal_offset(causal, Nq, Nk)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not math.isfinite(_as_float("scale", scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return Problem(
        q=qf, k=kf, v=vf, mask=maskf, offset=offset, scale=float(scale), batch_shape=batch_shape,
        lead_shapes=lead, framework=framework, device=device,
    )


def check_int(name: str, value, *, minimum=None, maximum=None, allow_none=False):
    """An integer parameter within ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is too small; it must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is too large; it must be at most {maximum}")
    return value


def check_float(name: str, value, *, minimum=None, maximum=None, open_min=False, allow_none=False):
    """A finite real parameter within its range (``open_min`` excludes ``minimum``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = _as_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        bound = f"greater than {minimum}" if open_min else f"at least {minimum}"
        raise ValueError(f"{name}={value} is out of range; it must be {bound}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is out of range; it must be at most {maximum}")
    return value


def check_choice(name: str, value, choices):
    """One of a fixed set of values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_bool(name: str, value):
    """A bool parameter."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_array_shape(name: str, a, expected: tuple, what: str = ""):
    """An array whose trailing shape equals ``expected`` (None matches any size)."""
    shape = tuple(a.shape)
    tail = shape[len(shape) - len(expected):] if len(shape) >= len(expected) else None
    if tail is None or any(e is not None and e != t for e, t in zip(expected, tail)):
        want = "(..., " + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}{what}, got shape {shape}")
    return a


def flatten_leading(name: str, a, problem: Problem, tail: tuple):
    """``a`` of shape ``(..., *tail)`` broadcast to the problem's leading axes and flattened to ``(G, *tail)``."""
    try:
        b = np.broadcast_to(a, (*problem.batch_shape, *tail))
    except ValueError:
        raise ValueError(
            f"{name} has shape {np.shape(a)}; its leading axes must broadcast to the inputs' {problem.batch_shape}"
        ) from None
    return np.ascontiguousarray(b).reshape(problem.G, *tail)


def _format_bytes(n: int) -> str:
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def memory_limit(device: str = "cpu") -> int:
    """Bytes one array may take at most: the host's physical memory, or the GPU's total memory.

    No allocation can exceed what the machine has, so :func:`check_memory`
    refuses such sizes before anything is allocated or drawn.
    """
    if device == "gpu":
        import cupy

        return int(cupy.cuda.Device().mem_info[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): the 48-bit address space
        return 2**48


def check_memory(name: str, value, shape, itemsize: int = 8, *, device: str = "cpu", what: str = "an array"):
    """Refuse a parameter whose array of ``shape`` (``itemsize`` bytes each) cannot fit in memory.

    Called from a method's ``resolve`` with the largest array a parameter
    sizes, before anything is allocated or drawn. The message names the
    parameter, its value and the bytes it would need.

    Raises
    ------
    ValueError
        If ``prod(shape) * itemsize`` exceeds :func:`memory_limit`.
    """
    need = math.prod(int(n) for n in shape) * int(itemsize)
    limit = memory_limit(device)
    if need > limit:
        raise ValueError(
            f"{name}={value} is too large: {what} of shape {tuple(int(n) for n in shape)} would need "
            f"{need} bytes ({_format_bytes(need)}), more than this machine's {_format_bytes(limit)} of memory"
        )
    return value


def value_rescale(v) -> float:
    """A power of two ``c`` such that ``v / c`` keeps every method's sums inside the dtype's range.

    Every method's output is linear in ``v`` (``out = A(q, k) v``), so
    running on ``v / c`` and multiplying the output by ``c`` gives the same
    result, exactly (``c`` is a power of two), while sums such as
    ``sum_j v_j`` no longer overflow float32 when ``max |v|`` is near the
    top of the range. ``c = 1`` (no rescaling) unless ``max |v|`` exceeds
    ``2**(maxexp / 2)`` (``2**64`` in float32, ``2**512`` in float64);
    then ``c = 2**e`` with ``max |v / c|`` in ``[0.5, 1)``. Non-finite or
    empty ``v`` give 1.
    """
    if v.size == 0:
        return 1.0
    top = max(float(v.max()), -float(v.min()))                               # max |v|, no temporary
    finfo = np.finfo(v.dtype)
    if not math.isfinite(top) or top <= 2.0 ** (finfo.maxexp // 2):
        return 1.0
    return 2.0 ** math.frexp(top)[1]
