"""Attention in bf16 by a small C kernel of our own (`cpu_attention.c`), on CPUs with AVX512-BF16.

PyTorch's CPU attention computes a bf16 prefill at fp32 speed: 121 ms a layer for 3.6k positions in 256-token
chunks, ~60 GFLOP/s where bf16 matrix products reach ~400 on the same cores, and no arrangement of PyTorch's own
operators did better (docs/benchmarks.md, "Prefill's attention"); attention is then half of a long prefill. A decoded
position, one query row a head, reads the cache through SDPA at a fraction of the memory's speed. The kernel computes
both with the CPU's bf16 dot-product instruction: prefill flash-attention style, decoding split over the keys and
merged (flash-decoding).

It is compiled once per machine with the system's C compiler (`$CC`, else `cc`) into the user's cache folder and
loaded with ctypes: no build step at install. Where there is no such CPU or no compiler, `kernel()` says why and the
engine keeps PyTorch's attention."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512bf16", "-mfma")
KERNEL_ENV = "MCPFT_ATTENTION_KERNEL"  # "off": PyTorch's attention even where the kernel would run


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mcpft" / "kernels"


def _build(compiler: str) -> Path:
    """Compile the kernel unless this source with these flags already was; a finished library is renamed into
    place, so processes building at once never load a half-written file, and the builds it replaces are removed."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler,) + FLAGS).encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_attention-{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, library)
    for stale in library.parent.glob("cpu_attention-*.so"):  # builds of an older source or other flags
        if stale != library:
            stale.unlink(missing_ok=True)  # a process that loaded it keeps its mapping
    return library


class Kernel:
    def __init__(self, library: Path):
        loaded = ctypes.CDLL(str(library))
        pointer, long, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        self.prefill_function = loaded.mcpft_prefill_attention
        self.prefill_function.argtypes = [pointer, long, long, pointer, pointer, long, long, pointer, long, int_,
                                          int_, int_, int_, int_, float_, int_]
        self.decode_function = loaded.mcpft_decode_attention
        self.decode_function.argtypes = [pointer, pointer, pointer, long, long, pointer, int_, int_, int_, int_,
                                         float_, int_]
        for function in (self.prefill_function, self.decode_function):
            function.restype = int_

    @staticmethod
    def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        for name, tensor in (("q", q), ("keys", keys), ("values", values)):
            if tensor.dtype != torch.bfloat16 or tensor.stride(-1) != 1 or tensor.device.type != "cpu":
                raise ValueError(f"the attention kernel takes bf16 CPU tensors with a contiguous last dimension: "
                                 f"{name} is {tensor.dtype} on {tensor.device}, strides {tensor.stride()}")
        if keys.stride() != values.stride() or keys.shape != values.shape or keys.shape[1] < end:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must share a layout and "
                             f"hold {end} positions")

    @staticmethod
    def _refused(status: int, heads: int, kv_heads: int, dim: int, count: int, end: int) -> None:
        if status != 0:
            raise ValueError(f"the attention kernel does not take heads={heads}, kv_heads={kv_heads}, "
                             f"head_dim={dim}, {count} positions ending at {end} (status {status})")

    def prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
        """Causal attention of `count` new positions: q [heads, count, dim] at positions end - count.. over
        keys and values [kv_heads, >= end, dim] -> [count, heads * dim]."""
        self._check(q, keys, values, end)
        heads, count, dim = q.shape
        out = torch.empty((count, heads * dim), dtype=torch.bfloat16)
        status = self.prefill_function(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(),
                                       keys.stride(0), keys.stride(1), out.data_ptr(), out.stride(0), heads,
                                       keys.shape[0], count, end, dim, dim ** -0.5, torch.get_num_threads())
        self._refused(status, heads, keys.shape[0], dim, count, end)
        return out

    def decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
        """One decoded position's attention: q [heads, dim] over keys and values [kv_heads, >= end, dim] ->
        [heads * dim]."""
        q = q.contiguous()
        self._check(q, keys, values, end)
        heads, dim = q.shape
        out = torch.empty(heads * dim, dtype=torch.bfloat16)
        status = self.decode_function(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0),
                                      keys.stride(1), out.data_ptr(), heads, keys.shape[0], end, dim, dim ** -0.5,
                                      torch.get_num_threads())
        self._refused(status, heads, keys.shape[0], dim, 1, end)
        return out


@cache
def kernel() -> Kernel | str:
    """The compiled kernel, or why there is none on this machine."""
    if os.environ.get(KERNEL_ENV, "").lower() == "off":
        return f"{KERNEL_ENV}=off"
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "this CPU has no AVX512-BF16"
    compiler = os.environ.get("CC", "cc")
    try:
        return Kernel(_build(compiler))
    except FileNotFoundError:
        return f"no C compiler ({compiler!r}) to build it"
    except subprocess.CalledProcessError as error:
        return f"{compiler} could not build it: {error.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"it could not be built or loaded: {error}"


def supports(dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the kernel takes this attention's shape (as its C side checks)."""
    return dim % 16 == 0 and dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 16
