"""eff_attn.capture: the heads of a model, recorded and written in the documented heads format.

The oracles are independent of the recorder: the projections computed by hand
from the model's weights, and torch's own SDPA output of each recorded call.
"""

from __future__ import annotations

import numpy as np
import pytest

import eff_attn
from eff_attn.capture import HeadRecorder, capture, load_heads, validate_heads
from eff_attn.testing import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention through SDPA; ``outputs`` keeps what SDPA returned (the oracle)."""

    def __init__(self, dim=16, heads=4, kv_heads=None, scale=None):
        super().__init__()
        self.heads, self.kv_heads, self.scale = heads, kv_heads or heads, scale
        self.hd = dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * self.kv_heads * self.hd)
        self.outputs = []

    def project(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.heads, self.hd).transpose(1, 2)                 # (B, H, N, hd)
        k, v = self.kv(x).reshape(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)  # (B, Hkv, N, hd)
        return q, k, v

    def forward(self, x):
        q, k, v = self.project(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        self.outputs.append(out.detach().numpy())
        return x + out.transpose(1, 2).reshape(x.shape)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return torch.nn.Sequential(SelfAttention(**kwargs), SelfAttention(**kwargs)).eval()


def test_capture_round_trip_gives_each_layers_projections(tmp_path):
    model = tiny_model()
    inputs = [torch.randn(1, 12, 16), torch.randn(1, 12, 16), torch.randn(2, 20, 16)]
    with torch.no_grad():
        capture(model, inputs, tmp_path / "h.npz", labels=["a", "b", "c"], model_name="tiny")
        with np.load(tmp_path / "h.npz") as data:
            assert validate_heads(data) == [12, 20]
            assert data["layers_heads"].tolist() == [[layer, h] for layer in range(2) for h in range(4)]
            assert str(data["model"]) == "tiny" and "causal" not in data
            assert data["texts_12"].tolist() == ["a", "b"] and data["texts_20"].tolist() == ["c[0]", "c[1]"]
            stored = {n: data[f"q_{n}"].shape for n in (12, 20)}
        assert stored == {12: (2, 8, 12, 4), 20: (2, 8, 20, 4)}
        # oracle: the projections by hand, layer by layer
        x = inputs[2]
        expected = []
        for layer in model:
            expected.append(torch.stack(layer.project(x)).numpy())                          # (3, B, H, N, hd)
            x = layer(x)
    q, k, v, meta = load_heads(tmp_path / "h.npz", 20)
    assert q.shape == (2 * 8, 20, 4) and meta["samples"] == 2 and not meta["causal"]
    by_head = np.stack(expected, axis=2).reshape(3, 2 * 2 * 4, 20, 4)                       # sample, layer, head
    assert_close(np.stack([q, k, v]), by_head, rel=1e-6)


def test_stored_heads_reproduce_sdpa_with_a_custom_scale_and_grouped_kv(tmp_path):
    model = tiny_model(heads=4, kv_heads=2, scale=0.7)
    with torch.no_grad():
        capture(model, [torch.randn(1, 10, 16)], tmp_path / "h.npz", dtype="float64")
    q, k, v, _ = load_heads(tmp_path / "h.npz")
    out = eff_attn.attention(q, k, v, method="exact", backend="numpy")                      # default 1/sqrt(D)
    sdpa = np.concatenate([layer.outputs[-1][0] for layer in model])                        # (layers * H, N, hd)
    assert_close(out, sdpa, rel=1e-5)


def test_causal_calls_are_marked_and_masked_calls_refused(tmp_path):
    class Causal(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)

    q = torch.randn(1, 2, 6, 4)
    capture(Causal(), [(q, q, q)], tmp_path / "c.npz")
    assert load_heads(tmp_path / "c.npz")[3]["causal"]
    keep_all = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    capture(Causal(), [(q, q, q, keep_all)])                                                # hides nothing: fine
    padded = keep_all.clone()
    padded[..., -1] = False
    with pytest.raises(ValueError, match="padding is not stored"):
        capture(Causal(), [(q, q, q, padded)])


def test_module_hooks_record_hand_written_attention(tmp_path):
    class HandAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.proj(x).reshape(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return (torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v).transpose(1, 2).reshape(x.shape)

    torch.manual_seed(1)
    model = torch.nn.Sequential(HandAttention(), HandAttention())

    def qkv_of(module, args, kwargs):
        return module.proj(args[0]).reshape(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)

    x = torch.randn(1, 9, 8)
    with torch.no_grad():
        capture(model, [x], tmp_path / "m.npz", modules={"1": qkv_of, "0": qkv_of})
        first = qkv_of(model[0], (x,), {}).numpy()                                          # (3, 1, 2, 9, 4)
    with np.load(tmp_path / "m.npz") as data:
        assert data["layer_names"].tolist() == ["1", "0"]
    q, k, v, _ = load_heads(tmp_path / "m.npz")
    assert_close(np.stack([q, k, v])[:, 2:], first[:, 0], rel=1e-6)                          # layer 1 is "0"
    with pytest.raises(ValueError, match="'blocks.3' is not a submodule"):
        capture(model, [x], modules={"blocks.3": qkv_of})


def test_numpy_recipe_records_one_sample_per_pass(tmp_path):
    rng = np.random.default_rng(0)
    rec = HeadRecorder(model="numpy model")
    passes = [rng.standard_normal((3, 2, 5, 7, 4)) for _ in range(2)]                          # (3, layers, H, n, D)
    for i, qkv in enumerate(passes):
        with rec.sample(f"text {i}"):
            for layer in (1, 0):                                                              # explicit ids, any order
                rec(*qkv[:, layer], layer=layer)
    path = rec.save(tmp_path / "np.npz", keep=[(1, 4), (0, 0)], dtype="float64")
    q, k, v, meta = load_heads(path)
    assert meta["texts"] == ["text 0", "text 1"] and meta["layers_heads"] == [[1, 4], [0, 0]]
    expected = np.stack([np.stack([p[:, 1, 4], p[:, 0, 0]], axis=1) for p in passes], axis=1)  # (3, S, 2, n, D)
    assert_close(np.stack([q, k, v]), expected.reshape(3, 4, 7, 4), rel=1e-7)


def test_recorder_errors_name_the_problem(tmp_path):
    rec = HeadRecorder()
    with pytest.raises(ValueError, match="recorded no attention call"):
        with rec.sample("empty"):
            pass
    q = np.zeros((1, 2, 4, 3))
    with pytest.raises(ValueError, match="layer 0 was recorded twice"):
        with rec.sample():
            rec(q, q, q, layer=0)
            rec(q, q, q, layer=0)
    with pytest.raises(ValueError, match="only self-attention"):
        rec(q, np.zeros((1, 2, 5, 3)), np.zeros((1, 2, 5, 3)))
    with pytest.raises(ValueError, match="nothing was recorded"):
        HeadRecorder().save(tmp_path / "x.npz")


def test_validate_rejects_a_file_out_of_format(tmp_path):
    good = {"lengths": np.array([4]), "layers_heads": np.array([[0, 0]]), "model": np.array("m"),
            "q_4": np.zeros((1, 1, 4, 2)), "k_4": np.zeros((1, 1, 4, 2)), "v_4": np.zeros((1, 1, 4, 3))}
    assert validate_heads(good) == [4]
    with pytest.raises(ValueError, match="lacks layers_heads"):
        validate_heads({k: v for k, v in good.items() if k != "layers_heads"})
    with pytest.raises(ValueError, match="has no k_4"):
        validate_heads({k: v for k, v in good.items() if k != "k_4"})
    with pytest.raises(ValueError, match=r"q_4 must be float of shape \(samples, 1, 4, D\)"):
        validate_heads({**good, "q_4": np.zeros((1, 2, 4, 2))})


def test_the_shipped_real_heads_are_in_format():
    from importlib import resources

    with resources.files("eff_attn.bench").joinpath("data", "real_heads.npz").open("rb") as fh, np.load(fh) as d:
        assert validate_heads(d) == [128, 256, 512]


def test_jax_arrays_are_recorded_outside_jit(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    rec = HeadRecorder()
    x = jnp.arange(24, dtype=jnp.float32).reshape(1, 2, 3, 4)
    rec(x, x, x)
    q, _, _, _ = load_heads(rec.save(tmp_path / "j.npz"))
    assert_close(q, np.arange(24, dtype=np.float64).reshape(2, 3, 4), rel=0)
