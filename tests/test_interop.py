"""Frameworks at the boundary: DLPack round trips, torch and JAX adapters.

Gradients are checked against each framework's own autograd of an exact
reference written in that framework, and with ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import numpy as np
import pytest

import eff_attn
from eff_attn import interop
from eff_attn.testing import assert_close, random_qkv

torch = pytest.importorskip("torch")


def torch_reference(q, k, v, mask=None, causal=False):
    """Exact attention written with torch ops (bottom-right causal), for autograd."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    Nq, Nk = q.shape[-2], k.shape[-2]
    visible = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        visible = torch.arange(Nk)[None, :] <= (torch.arange(Nq) + Nk - Nq)[:, None]
    if mask is not None:
        visible = visible & mask[..., None, :]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# --- DLPack ------------------------------------------------------------------------------

def test_torch_cpu_tensors_are_shared_without_copy():
    t = torch.randn(2, 5, 4, dtype=torch.float64)
    array, framework, device = interop.to_kernel_array(t, "q")
    assert framework == "torch" and device == "cpu"
    assert array.ctypes.data == t.data_ptr()
    back = interop.from_kernel_array(array, "torch")
    assert isinstance(back, torch.Tensor) and back.data_ptr() == array.ctypes.data


def test_attention_returns_torch_tensors_in_the_input_dtype():
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    out = eff_attn.attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 3, 6, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close(out, expected, rel=1e-5)


def test_tensor_that_requires_grad_is_refused_by_the_plain_api():
    q = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(eff_attn.NotSupportedError, match=r"q requires grad.*eff_attn.torch.attention"):
        eff_attn.attention(q, q.detach(), q.detach())


def test_half_precision_torch_inputs_are_refused_with_a_hint():
    q = torch.randn(3, 4, dtype=torch.bfloat16)
    with pytest.raises(eff_attn.NotSupportedError, match=r"bfloat16.*Cast it first"):
        eff_attn.attention(q, q, q)


def test_mixed_frameworks_are_refused():
    q = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"one framework and device; q is torch on cpu, k is numpy on cpu"):
        eff_attn.attention(q, np.zeros((3, 4)), np.zeros((3, 4)))


def test_non_contiguous_tensors_are_accepted():
    q = torch.randn(4, 6, 2, dtype=torch.float64).transpose(0, 1)   # (6, 4, 2), strided
    out = eff_attn.attention(q, q, q)
    assert_close(out, torch_reference(q, q, q), rel=1e-12)


# --- the torch adapter ---------------------------------------------------------------------

def test_torch_attention_matches_sdpa_forward_and_gradients():
    from eff_attn.torch import attention

    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for causal, sdpa_causal in ((False, False), ("top_left", True)):
        out = attention(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal)
        assert_close(out, ref, rel=1e-12)
        g = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), g)
        theirs = torch.autograd.grad(ref, (q, k, v), g)
        for name, a, b in zip("qkv", ours, theirs):
            assert_close(a, b, rel=1e-10, what=f"d{name}")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_torch_gradcheck_in_float64(backend):
    pytest.importorskip(backend)
    from eff_attn.torch import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, backend=backend, mask=mask, causal=True), (q, k, v)
    )


def test_torch_module_is_a_drop_in_for_sdpa():
    from eff_attn.torch import EffAttention

    layer = EffAttention("exact", causal="top_left")
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = layer(q, k, v)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert_close(out.detach(), expected, rel=1e-12)
    assert "method='exact'" in repr(layer)


def test_torch_half_inputs_can_be_upcast():
    from eff_attn.torch import attention

    q = torch.randn(2, 5, 4).to(torch.bfloat16)
    with pytest.raises(eff_attn.NotSupportedError, match=r"upcast_half=True"):
        attention(q, q, q)
    out = attention(q, q, q, upcast_half=True)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), torch_reference(q.float(), q.float(), q.float()), rel=1e-2)


def test_torch_gradients_match_autograd_of_the_reference_with_masks_and_broadcasting():
    from eff_attn.torch import attention

    q = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)      # broadcast over (2, 3)
    v = torch.randn(3, 6, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 6) > 0.3
    mask[..., 0] = True   # every causal row sees a key (the torch reference gives NaN otherwise)
    out = attention(q, k, v, mask=mask, causal=True)
    ref = torch_reference(q, k, v, mask=mask, causal=True)
    assert_close(out, ref, rel=1e-12)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert a.shape == b.shape
        assert_close(a, b, rel=1e-10, what=f"d{name}")


@pytest.mark.gpu
def test_torch_cuda_round_trip_without_copy():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, k, v = (torch.randn(2, 64, 32, device="cuda") for _ in range(3))
    out = eff_attn.attention(q, k, v)
    assert out.device.type == "cuda"
    array, framework, device = interop.to_kernel_array(q, "q")
    assert device == "gpu" and array.data.ptr == q.data_ptr()
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rel=1e-4)


# --- the JAX adapter ---------------------------------------------------------------------------

jax = pytest.importorskip("jax")


@pytest.fixture(scope="module")
def jnp():
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp


def jax_reference(jnp, q, k, v, mask=None, causal=False):
    s = jnp.einsum("...id,...jd->...ij", q, k) / jnp.sqrt(q.shape[-1])
    Nq, Nk = q.shape[-2], k.shape[-2]
    visible = jnp.ones((Nq, Nk), dtype=bool)
    if causal:
        visible = jnp.arange(Nk)[None, :] <= (jnp.arange(Nq) + Nk - Nq)[:, None]
    if mask is not None:
        visible = visible & mask[..., None, :]
    return jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1) @ v


def test_jax_arrays_are_shared_without_copy(jnp):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    array, framework, device = interop.to_kernel_array(x, "q")
    assert framework == "jax" and device == "cpu"
    assert array.ctypes.data == x.unsafe_buffer_pointer()
    out = eff_attn.attention(x, x, x)
    assert isinstance(out, jax.Array)


def test_jax_attention_matches_the_jax_reference_with_gradients(jnp):
    from eff_attn.jax import attention

    q, k, v = (jnp.asarray(a) for a in random_qkv(0, batch=(2,), Nq=5, Nk=6))
    keep = np.random.default_rng(1).random((2, 6)) > 0.3
    keep[:, 0] = True   # every causal row sees a key (the JAX reference gives NaN otherwise)
    mask = jnp.asarray(keep)
    for causal in (False, True):
        assert_close(np.asarray(attention(q, k, v, mask=mask, causal=causal)),
                     np.asarray(jax_reference(jnp, q, k, v, mask, causal)), rel=1e-12)

        def loss(fn):
            return lambda a, b, c: (fn(a, b, c) ** 2).sum()

        ours = jax.grad(loss(lambda a, b, c: attention(a, b, c, mask=mask, causal=causal)), argnums=(0, 1, 2))(q, k, v)
        theirs = jax.grad(loss(lambda a, b, c: jax_reference(jnp, a, b, c, mask, causal)), argnums=(0, 1, 2))(q, k, v)
        for name, a, b in zip("qkv", ours, theirs):
            assert_close(np.asarray(a), np.asarray(b), rel=1e-10, what=f"d{name}")


def test_jax_attention_composes_with_jit_and_vmap(jnp):
    from eff_attn.jax import attention

    q, k, v = (jnp.asarray(a) for a in random_qkv(2, batch=(), Nq=4, Nk=4))
    jitted = jax.jit(lambda a, b, c: attention(a, b, c, causal=True))
    assert_close(np.asarray(jitted(q, k, v)), np.asarray(jax_reference(jnp, q, k, v, causal=True)), rel=1e-12)
    batched = jax.vmap(lambda a: attention(a, k, v))(jnp.stack([q, 2 * q]))
    assert batched.shape == (2, 4, 4)
    assert_close(np.asarray(batched[1]), np.asarray(jax_reference(jnp, 2 * q, k, v)), rel=1e-12)


def test_jax_half_inputs_need_upcast(jnp):
    from eff_attn.jax import attention

    q = jnp.ones((3, 4), dtype=jnp.bfloat16)
    with pytest.raises(eff_attn.NotSupportedError, match=r"upcast_half=True"):
        attention(q, q, q)
    assert attention(q, q, q, upcast_half=True).dtype == jnp.bfloat16
