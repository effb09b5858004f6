"""Record the q, k, v of your own model's attention heads into one ``.npz`` file.

The file is what ``eff-attn compare --problem my_heads.npz --target 0.1``
reads (see the tutorial "Choose a method for your model"). Three ways to
fill it:

- **PyTorch, modules that call SDPA** (most current models):
  :func:`capture` runs your model on your inputs while
  ``torch.nn.functional.scaled_dot_product_attention`` is wrapped
  (:func:`recording_sdpa`); every call is one layer, in call order::

      from eff_attn.capture import capture
      capture(model, inputs, "my_heads.npz")

- **PyTorch, attention written by hand**: name the attention modules and
  say how their inputs give q, k and v; a forward pre-hook records them::

      capture(model, inputs, "my_heads.npz",
              modules={"blocks.0.attn": qkv_of, "blocks.1.attn": qkv_of})

  with ``qkv_of(module, args, kwargs) -> (q, k, v)``, each of shape
  (batch, heads, n, D).

- **NumPy, JAX or anything else**: call a :class:`HeadRecorder` inside
  your attention function, one :meth:`HeadRecorder.sample` block per
  forward pass::

      rec = HeadRecorder(model="my-model")
      def attend(q, k, v, layer):             # q, k, v: (batch, heads, n, D)
          rec(q, k, v, layer=layer)
          return my_attention(q, k, v)
      for x in inputs:
          with rec.sample():
              my_forward(x, attend)
      rec.save("my_heads.npz")

  JAX arrays are read with ``numpy.asarray``, so record outside ``jax.jit``
  (or inside ``with jax.disable_jit():``): a traced array has no values.

File format (the ``real_heads`` format)
---------------------------------------
The one place this format is defined; :func:`load_heads` reads it,
:meth:`HeadRecorder.save` writes it and :func:`validate_heads` checks it.
The package's MiniLM heads (``eff_attn/bench/data/real_heads.npz``, made by
``scripts/extract_real_heads.py``) are such a file.

``q_<n>``, ``k_<n>``, ``v_<n>``
    float16, float32 or float64, shape (samples, heads, n, D), one triple
    per stored length ``n``. The queries, keys and values of each head right
    after the projections, before the scaled dot product: attention is
    ``softmax(q k^T / sqrt(D)) v``. A model with another scale ``s`` is
    stored with ``q * s * sqrt(D)``, so that the default scale gives its
    scores.
``lengths``
    int64, shape (lengths,): the stored ``n``, ascending.
``layers_heads``
    int64, shape (heads, 2): the (layer, head) of each stored head, 0-based.
``model``
    str: what the heads come from.
``texts``
    str, shape (samples,): a label per sample (a source text, an input),
    when every length holds the same samples; otherwise ``texts_<n>`` per
    length.
``causal`` (optional)
    bool: the model attends causally (``False`` when absent).
``layer_names`` (optional)
    str, shape (layers,): the module path or call of each layer index.

A sample is one sequence: one element of the batch of one forward pass.
Every sample of one length holds the same heads. Padding is not stored: a
recorded call whose mask hides any key is refused, so record unpadded
sequences (one per forward pass, or a batch of equal lengths).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from pathlib import Path

import numpy as np

__all__ = ["HeadRecorder", "capture", "recording_sdpa", "recording_modules", "load_heads", "validate_heads",
           "FORMAT_KEYS"]

#: The keys every heads file has besides the per-length arrays.
FORMAT_KEYS = ("lengths", "layers_heads", "model")

_DTYPES = ("float16", "float32", "float64")


def _to_numpy(x, name: str) -> np.ndarray:
    """A host float32 copy of a NumPy, torch, JAX or CuPy array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().to("cpu").float().numpy()
    elif hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        x = x.get()
    try:
        a = np.asarray(x)
    except Exception as exc:  # a jax tracer raises its own error type here
        raise TypeError(f"{name} has no values to record ({type(x).__name__}); record outside jax.jit, "
                        "or inside `with jax.disable_jit():`") from exc
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {a.dtype}")
    return np.array(a, dtype=np.float32)


def _as_batch_heads(a: np.ndarray, name: str) -> np.ndarray:
    """(batch, heads, n, D) from a 4-D array, or a 3-D (heads, n, D) one as batch 1."""
    if a.ndim == 3:
        return a[None]
    if a.ndim != 4:
        raise ValueError(f"{name} must have shape (batch, heads, n, D) or (heads, n, D), got {a.shape}")
    return a


class HeadRecorder:
    """Collects q, k, v of every attention call, sample by sample, and writes a heads file.

    Call it inside your attention: ``rec(q, k, v, layer=i)``. Wrap each
    forward pass in ``with rec.sample(label):``; calls outside a ``sample``
    block belong to one implicit pass.

    Parameters
    ----------
    model : str, default="unnamed model"
        Stored as the file's ``model`` entry.
    """

    def __init__(self, model: str = "unnamed model"):
        self.model = model
        self.passes: list[dict] = []        # each: {"label", "layers": {layer: (q, k, v)}, "causal", "names"}
        self._open = None

    # --- recording ---------------------------------------------------------------------------

    def _start(self, label):
        self._close()
        self._open = {"label": label, "layers": {}, "causal": False, "names": {}}

    def _close(self):
        current, self._open = self._open, None
        if current is not None:
            if not current["layers"]:
                raise ValueError(f"sample {current['label']!r} recorded no attention call; is the recorder "
                                 "called inside the attention (see eff_attn.capture)?")
            self.passes.append(current)

    @contextlib.contextmanager
    def sample(self, label=None):
        """Record one forward pass; ``label`` (default ``"sample <i>"``) names it in the file."""
        self._start(f"sample {len(self.passes)}" if label is None else str(label))
        try:
            yield self
        except BaseException:
            self._open = None
            raise
        self._close()

    def __call__(self, q, k, v, *, layer=None, causal=False, scale=None, name=None):
        """Record one attention call of the current forward pass.

        Parameters
        ----------
        q : array of shape (batch, heads, n, D) or (heads, n, D)
        k : array of shape (batch, heads_kv, n, D)
        v : array of shape (batch, heads_kv, n, Dv)
            NumPy, torch, JAX or CuPy. ``heads_kv`` may divide ``heads``
            (grouped-query attention): each key/value head is repeated.
        layer : int, optional
            The layer index; by default the number of calls so far in this pass.
        causal : bool, default=False
            Whether this call attends causally.
        scale : float, optional
            The call's score scale, if not ``1/sqrt(D)``; folded into q.
        name : str, optional
            What this layer is (a module path); stored in ``layer_names``.
        """
        if self._open is None:
            self._start(f"sample {len(self.passes)}")
        arrays = [_as_batch_heads(_to_numpy(x, n), n) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
        q, k, v = arrays                                                  # (B, H, n, D)
        if k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
            raise ValueError(f"q, k, v shapes do not form one attention call: {q.shape}, {k.shape}, {v.shape}")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"only self-attention is recorded: q has n={q.shape[-2]} but k has n={k.shape[-2]}")
        heads, kv_heads = q.shape[1], k.shape[1]
        if heads % kv_heads:
            raise ValueError(f"k and v have {kv_heads} heads, which does not divide the {heads} heads of q")
        k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))  # (B, H, n, D)
        if scale is not None:
            q = q * np.float32(scale * math.sqrt(q.shape[-1]))             # default scale gives the call's scores
        index = len(self._open["layers"]) if layer is None else int(layer)
        if index in self._open["layers"]:
            raise ValueError(f"layer {index} was recorded twice in sample {self._open['label']!r}; start each "
                             "forward pass with `with recorder.sample():`")
        self._open["layers"][index] = (q, k, v)
        self._open["causal"] |= bool(causal)
        if name is not None:
            self._open["names"][index] = str(name)

    # --- what was recorded -------------------------------------------------------------------

    def arrays(self) -> dict:
        """``{n: (labels, qkv)}`` with ``qkv`` of shape (3, samples, layers, heads, n, D), float32."""
        self._close()
        if not self.passes:
            raise ValueError("nothing was recorded")
        groups: dict[int, tuple[list, list]] = {}
        for p in self.passes:
            layers = sorted(p["layers"])
            if layers != list(range(len(layers))):
                raise ValueError(f"sample {p['label']!r} recorded layers {layers}, not 0..{len(layers) - 1}")
            shapes = {p["layers"][i][0].shape[1:] for i in layers}
            if len(shapes) != 1:
                raise ValueError(f"sample {p['label']!r} has layers of different (heads, n, D): {sorted(shapes)}")
            stacked = np.stack([np.stack(p["layers"][i]) for i in layers], axis=2)   # (3, B, layers, H, n, D)
            batch = stacked.shape[1]
            labels, blocks = groups.setdefault(stacked.shape[-2], ([], []))
            labels += [p["label"]] if batch == 1 else [f"{p['label']}[{b}]" for b in range(batch)]
            blocks.append(stacked)
        result = {}
        for n, (labels, blocks) in sorted(groups.items()):
            shapes = {b.shape[2:] for b in blocks}
            if len(shapes) != 1:
                raise ValueError(f"samples of length {n} have different (layers, heads, n, D): {sorted(shapes)}")
            result[n] = (labels, np.concatenate(blocks, axis=1))
        return result

    @property
    def causal(self) -> bool:
        return any(p["causal"] for p in self.passes)

    def save(self, path, *, keep=None, dtype="float32") -> Path:
        """Write the recorded heads as one heads file (format in this module's docstring).

        Parameters
        ----------
        path : str or Path
        keep : array of shape (heads, 2), optional
            The (layer, head) pairs to store, in this order; every head by default.
        dtype : {"float32", "float16", "float64"}, default="float32"

        Returns
        -------
        Path of the written file.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        groups = self.arrays()
        first = next(iter(groups.values()))[1]                                # (3, S, layers, H, n, D)
        if keep is None:
            layers, heads = first.shape[2], first.shape[3]
            keep = np.array([(i, h) for i in range(layers) for h in range(heads)], dtype=np.int64)
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim != 2 or keep.shape[1] != 2:
            raise ValueError(f"keep must have shape (heads, 2) of (layer, head) pairs, got {keep.shape}")
        out = {}
        for n, (_, qkv) in groups.items():
            if (keep < 0).any() or (keep[:, 0] >= qkv.shape[2]).any() or (keep[:, 1] >= qkv.shape[3]).any():
                raise ValueError(f"keep holds a (layer, head) outside the recorded {qkv.shape[2]} layers x "
                                 f"{qkv.shape[3]} heads")
            kept = qkv[:, :, keep[:, 0], keep[:, 1]]                             # (3, S, kept, n, D)
            for name, a in zip("qkv", kept):
                out[f"{name}_{n}"] = a.astype(dtype)
        extra = {}
        labels = [labels for labels, _ in groups.values()]
        if all(item == labels[0] for item in labels):
            extra["texts"] = np.array(labels[0])
        else:
            extra.update({f"texts_{n}": np.array(lab) for n, (lab, _) in groups.items()})
        names = {i: name for p in self.passes for i, name in p["names"].items()}
        if names:
            extra["layer_names"] = np.array([names.get(i, "") for i in range(first.shape[2])])
        if self.causal:
            extra["causal"] = np.array(True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **out, lengths=np.array(sorted(groups), dtype=np.int64),
                            model=np.array(self.model), layers_heads=keep, **extra)
        return path


# --- reading ------------------------------------------------------------------------------------


def validate_heads(data) -> list[int]:
    """Check a loaded heads file (a mapping of its arrays) against the format; return its lengths.

    Raises
    ------
    ValueError
        Naming the first key that is missing or out of shape.
    """
    missing = [key for key in FORMAT_KEYS if key not in data]
    if missing:
        raise ValueError(f"heads file lacks {', '.join(missing)} (see eff_attn.capture for the format)")
    lengths = [int(n) for n in np.ravel(data["lengths"])]
    if not lengths or lengths != sorted(set(lengths)):
        raise ValueError(f"lengths must be distinct and ascending, got {lengths}")
    pairs = np.asarray(data["layers_heads"])
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        raise ValueError(f"layers_heads must be integer (layer, head) pairs of shape (heads, 2), got {pairs.shape}")
    for n in lengths:
        arrays = {}
        for name in "qkv":
            key = f"{name}_{n}"
            if key not in data:
                raise ValueError(f"heads file lists length {n} but has no {key}")
            arrays[name] = a = data[key]
            if a.ndim != 4 or a.shape[1] != len(pairs) or a.shape[2] != n or a.dtype.name not in _DTYPES:
                raise ValueError(f"{key} must be float of shape (samples, {len(pairs)}, {n}, D), "
                                 f"got {a.dtype} {a.shape}")
        q, k, v = arrays["q"], arrays["k"], arrays["v"]
        if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(f"q_{n}, k_{n}, v_{n} disagree in shape: {q.shape}, {k.shape}, {v.shape}")
    return lengths


def load_heads(path, n: int | None = None, *, max_heads: int | None = None, sample: int | None = None,
               name: str = "the heads"):
    """Read a heads file: q, k, v of shape (heads, n, D) in float64, and its metadata.

    Parameters
    ----------
    path : str, Path or file object
    n : int, optional
        Sequence length. Without it, the longest stored one. A length that
        is not stored is the first ``n`` tokens of the shortest stored pass
        longer than it (a crop).
    max_heads : int, optional
        Keep the first ``max_heads`` of the (sample, head) rows.
    sample : int, optional
        Keep one sample only.
    name : str, default="the heads"
        What the file holds, for error messages.

    Returns
    -------
    (q, k, v, meta)
        Arrays of shape (samples * heads, n, D), sample-major, and a dict with
        ``model``, ``layers_heads``, ``source_length``, ``causal``, ``texts``
        and ``samples``.
    """
    with np.load(path) as data:
        lengths = validate_heads(data)
        n = lengths[-1] if n is None else n
        if not 1 <= n <= lengths[-1]:
            raise ValueError(f"{name} come at lengths {lengths} or crops of them, 1 <= n <= {lengths[-1]}; "
                             f"not n={n}")
        source = min(length for length in lengths if length >= n)
        q, k, v = (data[f"{name}_{source}"][:, :, :n].astype(np.float64) for name in "qkv")  # (S, heads, n, D)
        texts = data["texts"] if "texts" in data else data.get(f"texts_{source}", np.array([]))
        meta = {"model": str(data["model"]), "layers_heads": data["layers_heads"].tolist(),
                "source_length": source, "causal": bool(data["causal"]) if "causal" in data else False,
                "texts": [str(t) for t in texts], "samples": q.shape[0]}
    if sample is not None:
        q, k, v = q[sample : sample + 1], k[sample : sample + 1], v[sample : sample + 1]
    q, k, v = (a.reshape(-1, *a.shape[-2:]) for a in (q, k, v))               # (S * heads, n, D)
    if max_heads is not None:
        q, k, v = q[:max_heads], k[:max_heads], v[:max_heads]
    return q, k, v, meta


# --- PyTorch --------------------------------------------------------------------------------------


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """The arguments of ``torch.nn.functional.scaled_dot_product_attention``, by name."""
    return {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "dropout_p": dropout_p,
            "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}


def key_keep_mask(attn_mask):
    """An SDPA ``attn_mask`` as a key keep-mask of shape (..., n), or None when it hides nothing.

    Boolean masks that depend only on the key (key padding, shape (..., 1, n)
    or (..., n)) are supported; others raise ``ValueError``.
    """
    import torch

    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool:
        if bool((attn_mask == 0).all()):
            return None
        raise ValueError("an additive (float) attn_mask is not supported; pass a boolean key mask")
    if bool(attn_mask.all()):
        return None
    if attn_mask.ndim == 1:
        return attn_mask
    if not bool((attn_mask == attn_mask[..., :1, :]).all()):
        raise ValueError("an attn_mask that differs between queries is not supported; only key padding masks")
    return attn_mask[..., 0, :]                                               # (..., n)


@contextlib.contextmanager
def patched_sdpa(replacement):
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is ``replacement(original, **args)``.

    ``args`` are the call's arguments by name (see ``_sdpa_arguments``).
    Code that bound the function to another name before the block (``from
    torch.nn.functional import scaled_dot_product_attention``) is not
    affected; use :func:`recording_modules` for it.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def wrapped(*args, **kwargs):
        return replacement(original, **_sdpa_arguments(*args, **kwargs))

    F.scaled_dot_product_attention = wrapped
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def recording_sdpa(recorder: HeadRecorder):
    """Record every ``scaled_dot_product_attention`` call into ``recorder`` (and compute it as usual).

    A call whose mask hides a key raises ``ValueError``: padding cannot be
    stored, so capture unpadded inputs.
    """

    def record(original, **a):
        if key_keep_mask(a["attn_mask"]) is not None:
            raise ValueError("an SDPA call with a mask that hides keys cannot be recorded: padding is not stored; "
                             "capture unpadded sequences (one per forward pass)")
        recorder(a["query"], a["key"], a["value"], causal=a["is_causal"], scale=a["scale"])
        return original(**a)

    with patched_sdpa(record):
        yield recorder


@contextlib.contextmanager
def recording_modules(model, modules: dict, recorder: HeadRecorder):
    """Record q, k, v at the named submodules of ``model``: ``{path: qkv(module, args, kwargs)}``.

    Layer ``i`` is the ``i``-th entry of ``modules``; ``qkv`` returns
    (q, k, v), each of shape (batch, heads, n, D), from the module's inputs.
    """
    handles = []
    try:
        for layer, (path, qkv) in enumerate(modules.items()):
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise ValueError(f"modules: {path!r} is not a submodule of the model ({exc})") from exc

            def hook(mod, args, kwargs, layer=layer, path=path, qkv=qkv):
                recorder(*qkv(mod, args, kwargs), layer=layer, name=path)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def call_model(model, item):
    """``model(*item)`` for a tuple or list, ``model(**item)`` for a dict, ``model(item)`` otherwise."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def capture(model, inputs, path=None, *, modules=None, labels=None, model_name=None, dtype="float32"):
    """Run ``model`` on each of ``inputs`` and record q, k, v of every attention layer.

    Parameters
    ----------
    model : torch.nn.Module or callable
    inputs : iterable
        One forward pass each: a tensor (``model(x)``), a tuple of arguments
        or a dict of keyword arguments. Each batch element is one sample.
    path : str or Path, optional
        Where to write the heads file.
    modules : dict, optional
        ``{module path: qkv(module, args, kwargs)}``: record there with
        forward pre-hooks instead of wrapping SDPA.
    labels : list of str, optional
        A label per input (default ``"input <i>"``).
    model_name : str, optional
        Stored as ``model`` (default: the model's class name).
    dtype : {"float32", "float16", "float64"}, default="float32"
        Storage dtype of the file.

    Returns
    -------
    HeadRecorder
        With everything recorded (written to ``path`` when given).

    Notes
    -----
    The passes run with torch's grad mode as it is. PyTorch's
    ``nn.TransformerEncoderLayer`` takes a fused path without SDPA in eval
    mode when gradients are off; a pass that records nothing raises
    ``ValueError``.
    """
    importlib.import_module("torch")
    inputs = list(inputs)
    labels = [f"input {i}" for i in range(len(inputs))] if labels is None else list(labels)
    if len(labels) != len(inputs):
        raise ValueError(f"labels has {len(labels)} entries for {len(inputs)} inputs")
    recorder = HeadRecorder(model=model_name or type(model).__name__)
    hooks = recording_modules(model, modules, recorder) if modules else recording_sdpa(recorder)
    with hooks:
        for item, label in zip(inputs, labels):
            with recorder.sample(label):
                call_model(model, item)
    if path is not None:
        recorder.save(path, dtype=dtype)
    return recorder
