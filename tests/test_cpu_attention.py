"""The bf16 attention kernel (mcpft/cpu_attention.c), prefill and decoding, against PyTorch's attention in fp32 on
the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcpft import cpu_attention
from mcpft.cpu_attention import Kernel, kernel

HAS_BF16 = torch.cpu._is_avx512_bf16_supported()


def test_the_kernel_is_built_exactly_where_the_cpu_computes_bf16():
    found = kernel()
    assert isinstance(found, Kernel) == HAS_BF16, found
    if not HAS_BF16:
        assert "AVX512-BF16" in found


def test_it_is_compiled_once_replacing_older_builds_and_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    found = kernel.__wrapped__()  # not the process's cached answer
    assert isinstance(found, str) and ("no C compiler" in found if HAS_BF16 else "AVX512-BF16" in found)
    assert not list(tmp_path.rglob("*.so"))
    monkeypatch.setenv("CC", "cc")
    if HAS_BF16:
        stale = tmp_path / "mcpft" / "kernels" / "cpu_attention-0123456789abcdef.so"  # an older source's build
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"old")
        assert isinstance(kernel.__wrapped__(), Kernel)
        built_once = list((tmp_path / "mcpft" / "kernels").glob("cpu_attention-*.so"))
        assert len(built_once) == 1 and built_once[0] != stale
        stamp = built_once[0].stat().st_mtime_ns
        assert isinstance(kernel.__wrapped__(), Kernel) and built_once[0].stat().st_mtime_ns == stamp
    monkeypatch.setenv("MCPFT_ATTENTION_KERNEL", "off")
    assert "MCPFT_ATTENTION_KERNEL=off" in kernel.__wrapped__()


@pytest.fixture(scope="module")
def built() -> Kernel:
    found = kernel()
    if not isinstance(found, Kernel):
        pytest.skip(f"no kernel on this machine: {found}")  # the test above checks that this is the CPU's doing
    return found


def exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
    heads, count, dim = q.shape
    mask = torch.ones(count, end, dtype=torch.bool).tril(diagonal=end - count)
    out = F.scaled_dot_product_attention(q.float()[None], keys[None, :, :end].float(), values[None, :, :end].float(),
                                         attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(count, heads * dim)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (2, 2, 128), (8, 1, 32)])
@pytest.mark.parametrize(("count", "end"), [(1, 1), (2, 2), (5, 7), (33, 100), (64, 64), (100, 300), (256, 1100)])
def test_causal_attention_of_new_positions_matches_fp32(built, heads, kv_heads, dim, count, end):
    """New positions end - count .. end - 1 over the cached keys before them and, causally, each other; the cache
    holds more positions than `end` (stale ones must not be seen) and q comes in the engine's strided layout."""
    torch.manual_seed(end + dim)
    capacity = end + 37
    keys, values = (torch.randn(kv_heads, capacity, dim).to(torch.bfloat16) for _ in range(2))
    values[:, end:] = float("nan")  # positions past `end` are never read into the answer
    q = (torch.randn(count, heads, dim) * 2).to(torch.bfloat16).transpose(0, 1)
    out = built.prefill(q, keys, values, end)
    assert out.shape == (count, heads * dim) and out.dtype == torch.bfloat16
    want = exact(q, keys, values, end)
    assert float((out.float() - want).abs().max()) < 0.02
    assert float((out.float() - want).norm() / want.norm()) < 0.005


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (16, 1, 128), (4, 4, 32)])
@pytest.mark.parametrize("end", [1, 17, 256, 257, 1000, 3600])
def test_a_decoded_position_attends_as_fp32_does(built, heads, kv_heads, dim, end):
    """One new position over the whole cache, split into several parts of keys and merged, as in decoding."""
    torch.manual_seed(end + heads)
    keys, values = (torch.randn(kv_heads, end + 5, dim).to(torch.bfloat16) for _ in range(2))
    values[:, end:] = float("nan")
    q = (torch.randn(heads, dim) * 2).to(torch.bfloat16)
    out = built.decode(q, keys, values, end)
    assert out.shape == (heads * dim,) and out.dtype == torch.bfloat16
    want = exact(q[:, None], keys, values, end)[0]
    assert float((out.float() - want).abs().max()) < 0.02
    assert float((out.float() - want).norm() / want.norm()) < 0.005


def test_it_refuses_what_it_cannot_compute(built):
    keys = torch.randn(2, 10, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        built.prefill(torch.randn(4, 3, 64), keys, keys, 10)
    with pytest.raises(ValueError, match="hold 12 positions"):
        built.decode(torch.randn(4, 64).to(torch.bfloat16), keys, keys, 12)
    odd = torch.randn(2, 10, 24).to(torch.bfloat16)
    assert not cpu_attention.supports(24, 4, 2) and not cpu_attention.supports(64, 34, 2)
    with pytest.raises(ValueError, match="head_dim=24"):
        built.prefill(torch.randn(4, 3, 24).to(torch.bfloat16), odd, odd, 10)
    with pytest.raises(ValueError, match="heads=34"):
        built.decode(torch.randn(34, 64).to(torch.bfloat16), keys, keys, 10)
