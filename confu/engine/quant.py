"""GGUF-exact weight-only quantized linear layers for the CPU.

A GGUF target (the embedded SmolLM2 is Q4_1 with a Q8_0 embedding) is dequantised to float32 when transformers
loads it, and those float32 values *are* the model. Streaming them costs 538 MB per forward on a CPU where a
one-token step is memory-bound. `pack_exact` recovers each weight's GGUF blocks from its float32 values, and
accepts them only when dequantising gives back every weight bit for bit; `PackedLinear` then runs the
layer through `kernels.c` (AVX2, 4.5-8.5 bits per weight instead of 32), and through `F.linear` on the same
float32 weight wherever the kernel does not apply (autograd through the target, GPU, other dtypes).

Same weights, different summation order: the kernel's outputs differ from MKL's by fp32 rounding only. Plain
and speculative decoding both run through the same modules, so they always share one set of numerics.

Opt-in (`Target(numerics="q8")`, `pack_model(q8_activations=True)`): llama.cpp's numerics, the same GGUF
weights with activations rounded to 8 bits per block of 32 and exact integer block dot products (AVX512-VNNI).
Past a few rows a verify pass is bound by fp32 FMAs on a CPU; the integer dot products do four times the work
per instruction. It is a different model numerics (as llama.cpp's is), shared by plain and speculative decoding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 32
SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
AVX512_FLAGS = ("-mavx512f",)  # 16-lane tiles where the CPU has them (kernels.c: twice the work per instruction)
VNNI_FLAGS = ("-mavx512bw", "-mavx512vnni")  # the draft head's int8 kernel (64 byte products an instruction)
# A build takes a few seconds; a compiler that hangs (a broken toolchain, a stalled network file system) must not
# hang the first decode with it: past this, the kernels count as unavailable and decoding runs torch's modules.
COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class KernelStatus:
    library: ctypes.CDLL | None
    reason: str  # why there is no library, or where it was loaded from
    lanes: int = 0  # partial sums per dot product (8: AVX2, 16: AVX-512): the kernels' summation order
    int8: bool = False  # the int8 x int8 kernels are built (AVX512-VNNI): the draft head's, and `numerics="q8"`
    attention: bool = False  # the row-invariant attention kernel is built (AVX-512; `confu.engine.attention`)
    draft_layer: bool = False  # the fused draft layer and top-k are built (AVX512-VNNI; `confu.engine.draft_kernel`)
    norm_mlp: bool = False  # the row-wise RMSNorm and SiLU-gate kernels are built (AVX-512; `confu.engine.fused`)


def _cpu_flags() -> set[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((li for li in info.splitlines() if li.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def compile_flags(flags: set[str], avx512: bool = True) -> tuple[str, ...]:
    """The compiler flags for a CPU with these /proc/cpuinfo flags (AVX-512 only where it has it and `avx512`)."""
    if not (avx512 and "avx512f" in flags):
        return CFLAGS
    return CFLAGS + AVX512_FLAGS + (VNNI_FLAGS if {"avx512bw", "avx512_vnni"} <= flags else ())


def _compile(out: Path, cflags: tuple[str, ...]) -> str | None:
    """Build the shared library at `out` (atomically) within COMPILE_TIMEOUT_S; returns an error message or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc / gcc) on PATH"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        try:
            # its own process group: on a timeout the compiler's children (cc1, as) go with it
            proc = subprocess.Popen([compiler, *cflags, str(SOURCE), "-lm", "-o", str(tmp_out)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        except OSError as err:
            return f"cannot run the C compiler {compiler}: {err}"
        with proc:
            try:
                _, stderr = proc.communicate(timeout=COMPILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return f"{compiler} did not finish building the kernels within {COMPILE_TIMEOUT_S} s"
        if proc.returncode != 0:
            return f"{compiler} failed: {stderr.strip()[-500:]}"
        tmp_out.replace(out)
    return None


def _open(path: Path) -> ctypes.CDLL | None:
    """The library at `path`, or None where it does not load as ours (truncated, corrupt, not a library)."""
    try:
        lib = ctypes.CDLL(str(path))  # after torch: the kernels share torch's OpenMP runtime (libgomp.so.1)
    except OSError:
        return None
    return lib if hasattr(lib, "kernel_lanes") else None  # a library, but no build of kernels.c


def typed(lib: ctypes.CDLL, signatures: dict[str, list]) -> ctypes.CDLL:
    """`lib` with these functions' argument types set (each returns void)."""
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


class KernelFamily:
    """Some of `kernels.c`'s functions, declared with their C signatures beside the code that calls them.

    `library()` is this machine's kernel library with those signatures set, or None where there is none or its
    build lacks the family (`built`: the `KernelStatus` flag that says whether it has them).
    """

    def __init__(self, built: str, **signatures: list):
        self.built, self.signatures = built, signatures
        self._typed: ctypes.CDLL | None = None

    def library(self) -> ctypes.CDLL | None:
        status = kernel_status()
        if not getattr(status, self.built):
            return None
        if self._typed is not status.library:  # a library loaded anew (tests reload it) needs its types again
            self._typed = typed(status.library, self.signatures)
        return status.library


_P, _I = ctypes.c_void_p, ctypes.c_int
# The matmuls `packed_matmul` runs; the int8 ones are built with AVX512-VNNI only.
MATMULS = {"q4_1_matmul": [_P, _I, _I, _P, _P, _P, _I, _P], "q8_0_matmul": [_P, _I, _I, _P, _P, _I, _P]}
INT8_MATMULS = {"i8_matmul": [_P, _I, _I, _P, _P, _P, _I, _P], "a8_matmul": [_P, _I, _I, _P, _P, _P, _P, _I, _P]}


@functools.cache
def kernel_status() -> KernelStatus:
    """Compile (once per machine and source version, cached under $CONFU_CACHE/kernels) and load the kernels.

    CONFU_NO_KERNELS=1 turns them off; CONFU_KERNELS_AVX2=1 builds the 8-lane kernels on an AVX-512 CPU."""
    if os.environ.get("CONFU_NO_KERNELS"):
        return KernelStatus(None, "disabled by CONFU_NO_KERNELS")
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return KernelStatus(None, "the CPU lacks AVX2 / FMA (or is not x86-64)")
    return load_kernels(compile_flags(flags, avx512=not os.environ.get("CONFU_KERNELS_AVX2")))


def kernel_path(cflags: tuple[str, ...]) -> Path:
    """Where the build with `cflags` of this `kernels.c` is cached."""
    from confu.hub import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"confu-kernels-{key}.so"


def load_kernels(cflags: tuple[str, ...]) -> KernelStatus:
    """The kernels built with `cflags`: compiled once, then loaded from the cache; a cached build that does not
    load (a disk that filled up, a copy cut short) is built again rather than failing every run after."""
    path = kernel_path(cflags)
    lib = _open(path) if path.is_file() else None
    if lib is None:
        error = _compile(path, cflags)
        if error:
            return KernelStatus(None, error)
        lib = _open(path)
        if lib is None:
            return KernelStatus(None, f"{path} was built but does not load")
    # the build's flags: which families it has (each family's user declares the signatures it calls)
    for flag in ("kernel_lanes", "i8_vnni", "attend_rows_built", "draft_layer_built", "norm_mlp_built"):
        getattr(lib, flag).restype = _I
    int8 = bool(lib.i8_vnni())
    typed(lib, {**MATMULS, **(INT8_MATMULS if int8 else {})})
    return KernelStatus(lib, str(path), lib.kernel_lanes(), int8, bool(lib.attend_rows_built()),
                        bool(lib.draft_layer_built()), bool(lib.norm_mlp_built()))


@dataclass(frozen=True)
class PackedWeight:
    """A weight (N, K) in GGUF blocks of 32 along K: Q4_1 (`q` (N, K/2) uint8, `d`, `m` (N, K/32)) or Q8_0
    (`q` (N, K) int8, `d` (N, K/32), no `m`); the same blocks laid out for `kernels.c`'s `a8_matmul` (Q8
    activations: "a8_q4_1", `q` (N'/16, K/32, 4, 16, 4) nibbles, `d`, `m` (N'/16, K/32, 16); "a8_q8_0", `q`
    (N'/16, K/32, 8, 16, 4) int8, `d` and `m` = the int32 block sums of q, (N'/16, K/32, 16); N' = N rounded up to
    16, the extra outputs zero); or, for the draft head only, "i8": int8 per output channel in the layout of
    `i8_matmul` (`q` (N'/16, K/4, 16, 4) int8; `d` the N scales, `m` the N int32 row sums of the int8 weights)."""

    kind: str
    q: Tensor
    d: Tensor
    m: Tensor | None
    out_features: int  # N (the padded layouts hold more rows)

    @property
    def tiled(self) -> bool:
        """`q` is in tiles of 16 outputs (the Q8-activation and int8 layouts), not one row per output."""
        return self.kind.startswith("a8_") or self.kind == "i8"


def _fp16_exact(x: Tensor) -> bool:
    return bool(torch.equal(x.half().float(), x))


def pack_q4_1(w: Tensor) -> PackedWeight | None:
    """Q4_1 blocks whose dequantisation `d * q + m` gives back `w` exactly, or None."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    m = blocks.amin(-1)
    d = (blocks.amax(-1) - m) / 15  # Q4_1 maps a block's min to q = 0 and its max to q = 15
    if not (_fp16_exact(d) and _fp16_exact(m)):
        return None
    q = ((blocks - m[..., None]) / torch.where(d > 0, d, 1)[..., None]).round()
    if q.amin() < 0 or q.amax() > 15 or not torch.equal(q * d[..., None] + m[..., None], blocks):
        return None
    q = q.to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    return PackedWeight("q4_1", packed, d.contiguous(), m.contiguous(), n)


def pack_q8_0(w: Tensor) -> PackedWeight | None:
    """Q8_0 blocks whose dequantisation `d * q` gives back `w` exactly, or None."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127  # Q8_0 maps a block's largest magnitude to |q| = 127
    if not _fp16_exact(d):
        return None
    q = (blocks / torch.where(d > 0, d, 1)[..., None]).round()
    if q.abs().amax() > 127 or not torch.equal(q * d[..., None], blocks):
        return None
    return PackedWeight("q8_0", q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous(), None, n)


def quantize_q8_0(w: Tensor) -> PackedWeight:
    """Round `w` to Q8_0 (llama.cpp's rule: per 32 weights, d = max |w| / 127 in fp16, q = round(w / d)).

    Lossy, unlike `pack_exact`: for the draft head only, whose outputs are proposals the target accepts or
    rejects, so its numerics never reach the output distribution.
    """
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half().float()
    q = (blocks / torch.where(d > 0, d, 1)[..., None]).round().clamp(-127, 127)
    return PackedWeight("q8_0", q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous(), None, n)


def _blocks_of_16_outputs(t: Tensor) -> Tensor:
    """(N, ...) -> (ceil(N / 16), 16, ...), the missing outputs zero."""
    padded = t.new_zeros((-(-t.shape[0] // 16) * 16, *t.shape[1:]))
    padded[: t.shape[0]] = t
    return padded.view(-1, 16, *t.shape[1:])


def quantize_i8(w: Tensor) -> PackedWeight:
    """Round `w` to int8 with one scale per output channel (max |w| / 127), laid out for `i8_matmul`.

    Lossy, for the draft head only (see `quantize_q8_0`); its activations are rounded to int8 per row in the
    kernel. Measured on the shipped EAGLE-3 draft: tau 1.9785 against 1.9799 in float32 (our 30 prompts, 16/6/8).
    """
    n, k = w.shape
    w = w.detach().float()
    scale = w.abs().amax(1) / 127
    q = (w / torch.where(scale > 0, scale, 1)[:, None]).round().clamp(-127, 127).to(torch.int8)
    layout = _blocks_of_16_outputs(q.view(n, k // 4, 4)).transpose(1, 2).contiguous()
    return PackedWeight("i8", layout, scale.contiguous(), q.sum(1, dtype=torch.int32), n)


def for_q8_activations(packed: PackedWeight) -> PackedWeight:
    """The same GGUF blocks laid out for `a8_matmul` (activations rounded to Q8 blocks: `numerics="q8"`)."""
    n = packed.q.shape[0]
    scales = _blocks_of_16_outputs(packed.d).transpose(1, 2).contiguous()  # (N'/16, K/32, 16)
    if packed.kind == "q4_1":
        halves = packed.q.view(n, -1, 16)  # byte j of a block: q[j] low, q[j + 16] high, as `a8_matmul` reads them
        q = _blocks_of_16_outputs(halves.view(n, -1, 4, 4))  # (N'/16, 16, K/32, j, 4)
        minimums = _blocks_of_16_outputs(packed.m).transpose(1, 2).contiguous()
        return PackedWeight("a8_q4_1", q.permute(0, 2, 3, 1, 4).contiguous(), scales, minimums, n)
    if packed.kind == "q8_0":
        q = _blocks_of_16_outputs(packed.q.view(n, -1, 8, 4))  # (N'/16, 16, K/32, j, 4)
        sums = q.sum((-2, -1), dtype=torch.int32).transpose(1, 2).contiguous()
        return PackedWeight("a8_q8_0", q.permute(0, 2, 3, 1, 4).contiguous(), scales, sums, n)
    raise ValueError(f"no Q8-activation layout for {packed.kind}")


def stack_outputs(first: PackedWeight, second: PackedWeight) -> PackedWeight | None:
    """One weight whose outputs are `first`'s then `second`'s (two layers that read the same input, as one
    matmul), or None where the layouts cannot be joined: different kinds, or a layout in tiles of 16 outputs
    (Q8 activations, int8) whose first part ends inside a tile. Every output keeps its blocks and scales, so it
    gets the same bits as before."""
    if first.kind != second.kind or (first.tiled and first.out_features % 16):
        return None

    def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None else torch.cat([a, b]).contiguous()

    return PackedWeight(first.kind, join(first.q, second.q), join(first.d, second.d), join(first.m, second.m),
                        first.out_features + second.out_features)


def split_outputs(stacked: PackedWeight, first: int) -> tuple[PackedWeight, PackedWeight]:
    """Views of a `stack_outputs` weight: its first `first` outputs and the rest (the layouts are output-major,
    so each part is a contiguous slice). Lets the separate layers share the stacked copy's memory."""

    def halves(t: Tensor | None, tiles: bool) -> tuple[Tensor | None, Tensor | None]:
        if t is None:
            return None, None
        n = first // 16 if tiles else first
        return t[:n], t[n:]

    # q follows the layout; d and m are in tiles only for the Q8-activation layouts (i8's are one per output)
    q, d, m = (halves(stacked.q, stacked.tiled), halves(stacked.d, stacked.kind.startswith("a8_")),
               halves(stacked.m, stacked.kind.startswith("a8_")))
    return (PackedWeight(stacked.kind, q[0], d[0], m[0], first),
            PackedWeight(stacked.kind, q[1], d[1], m[1], stacked.out_features - first))


def kernels_take(*tensors: Tensor) -> bool:
    """The CPU kernels can run on these tensors: float32 on the CPU, and no gradient wanted (they have no
    backward). Otherwise the callers run the module's own torch code."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grad and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def pack_exact(w: Tensor) -> PackedWeight | None:
    """The smallest GGUF block format that reproduces `w` bit for bit (float32 CPU weights only)."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[1] % BLOCK:
        return None
    return pack_q4_1(w) or pack_q8_0(w)


def packed_matmul(x: Tensor, packed: PackedWeight, lib: ctypes.CDLL) -> Tensor:
    """x (M, K) float32 contiguous @ W^T -> (M, N)."""
    m_rows, k = x.shape
    n = packed.out_features
    out = torch.empty(m_rows, n, dtype=torch.float32)
    if m_rows == 0:
        return out
    if packed.kind in ("a8_q4_1", "a8_q8_0"):
        aux = packed.m.data_ptr()  # Q4_1's block minimums or Q8_0's block sums of q
        minimums, sums = (aux, None) if packed.kind == "a8_q4_1" else (None, aux)
        lib.a8_matmul(x.data_ptr(), m_rows, k, packed.q.data_ptr(), packed.d.data_ptr(), minimums, sums, n,
                      out.data_ptr())
    elif packed.kind == "i8":
        lib.i8_matmul(x.data_ptr(), m_rows, k, packed.q.data_ptr(), packed.d.data_ptr(), packed.m.data_ptr(), n,
                      out.data_ptr())
    elif packed.kind == "q4_1":
        lib.q4_1_matmul(x.data_ptr(), m_rows, k, packed.q.data_ptr(), packed.d.data_ptr(), packed.m.data_ptr(),
                        n, out.data_ptr())
    else:
        lib.q8_0_matmul(x.data_ptr(), m_rows, k, packed.q.data_ptr(), packed.d.data_ptr(), n, out.data_ptr())
    return out


class PackedLinear(nn.Module):
    """An `nn.Linear` whose float32 weight is exactly a GGUF block format: the kernel runs it on the CPU.

    The original weight (and bias) stay, shared with the replaced module: autograd through the target (the
    soft prompt's gradient in training) and non-CPU / non-fp32 inputs take `F.linear` on them.
    """

    def __init__(self, linear: nn.Linear, packed: PackedWeight, lib: ctypes.CDLL):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = packed
        self.lib = lib

    def forward(self, x: Tensor) -> Tensor:
        if not kernels_take(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()
        out = packed_matmul(flat, self.packed, self.lib)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.packed.kind}"


def draft_numerics(device: torch.device | str = "cpu") -> str:
    """What a float32 draft head on `device` drafts with (`pack_model(..., lossy=True)`), for reports."""
    if torch.device(device).type != "cpu":
        return "the draft's own weights and dtype (no kernels off the CPU)"
    status = kernel_status()
    if status.library is None:
        return f"float32 ({status.reason})"
    fused = "; its decoder layer, final norm and top-k in fused kernels" if status.draft_layer else ""
    return _draft_rounding(status)[1] + fused


def _draft_rounding(status: KernelStatus) -> tuple[Callable[[Tensor], PackedWeight], str]:
    """How `pack_model(..., lossy=True)` rounds a draft's weights with these kernels, and its description."""
    if status.int8:
        return quantize_i8, "int8 weights per output channel x int8 activations per row (AVX512-VNNI kernel)"
    return quantize_q8_0, f"Q8_0 weights, fp32 activations ({status.lanes}-lane kernel)"


def _linear_children(model: nn.Module):
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, child


def pack_model(model: nn.Module, lossy: bool = False,
               q8_activations: bool = False) -> list[tuple[nn.Module, str, nn.Linear, PackedLinear]]:
    """Swap every linear layer whose weight is GGUF-exact (with `lossy`, every float32 CPU layer at least 32
    wide: rounded to int8 where the kernels have AVX512-VNNI, else to Q8_0) for a `PackedLinear`; returns the
    swaps made (parent, attribute, original, packed) so they can be undone. Nothing is swapped without the
    kernels. `q8_activations`: the exact layers run `a8_matmul` (llama.cpp's numerics; needs AVX512-VNNI)."""
    status = kernel_status()
    lib = status.library
    if lib is None:
        return []
    if q8_activations and not status.int8:
        raise RuntimeError("Q8 activations need the AVX512-VNNI kernels, which this CPU or build lacks")
    round_lossy = _draft_rounding(status)[0]
    swaps = []
    for parent, name, linear in list(_linear_children(model)):
        w = linear.weight
        packed = pack_exact(w)
        if packed is not None and q8_activations:
            packed = for_q8_activations(packed)
        elif packed is None and lossy and w.dtype == torch.float32 and w.device.type == "cpu" \
                and w.shape[1] % BLOCK == 0 and w.shape[0] >= BLOCK:
            packed = round_lossy(w)
        if packed is not None:
            swaps.append((parent, name, linear, PackedLinear(linear, packed, lib)))
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    return swaps
