"""Triton kernels of the hot operations; semantics are those of ``reference``.

Import this module only through ``tokcomp.ops.kernels`` (which imports it lazily). ``@triton.jit``
reads ``TRITON_INTERPRET`` when it decorates, so under ``TRITON_INTERPRET=1`` set *before* this
import the kernels run on CPU tensors through Triton's interpreter (tests); otherwise they need CUDA
tensors. All three are memory- or launch-bound: the design aims at one pass over the data, float32
accumulation, no atomics (so results are deterministic run to run), and enough programs to fill the
GPU. Block sizes are untuned defaults (no GPU was available when this was written); each wrapper
takes them as keyword arguments so a benchmark can sweep them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how the decorators below were applied


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ------------------------------------------------------------------------------------- frame_cosine


@triton.jit
def _frame_cosine_kernel(
    a_ptr, b_ptr, part_ptr,
    T, D, n_tblocks,
    sa_f, sa_t, sa_d, sb_f, sb_t, sb_d,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_T token positions of one frame pair, the whole D in BLOCK_D chunks. Writes the
    # sum of its tokens' cosines to part[f, tblock]; the host sums the (F, n_tblocks) partials.
    f = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    a_rows = a_ptr + f * sa_f + t.to(tl.int64)[:, None] * sa_t
    b_rows = b_ptr + f * sb_f + t.to(tl.int64)[:, None] * sb_t
    dot = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    aa = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    bb = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = t_ok[:, None] & (d < D)[None, :]
        x = tl.load(a_rows + d[None, :] * sa_d, mask=m, other=0.0).to(tl.float32)
        y = tl.load(b_rows + d[None, :] * sb_d, mask=m, other=0.0).to(tl.float32)
        dot += x * y
        aa += x * x
        bb += y * y
    na = tl.maximum(tl.sqrt(tl.sum(aa, axis=1)), eps)
    nb = tl.maximum(tl.sqrt(tl.sum(bb, axis=1)), eps)
    cos = tl.where(t_ok, tl.sum(dot, axis=1) / (na * nb), 0.0)
    tl.store(part_ptr + f * n_tblocks + tb, tl.sum(cos, axis=0))


def frame_cosine(a: Tensor, b: Tensor, *, block_t: int | None = None, block_d: int | None = None,
                 num_warps: int = 4) -> Tensor:  # fmt: skip
    reference.check_frame_cosine(a, b)
    n_f, n_t, n_d = a.shape
    if n_f == 0 or n_t == 0:
        return torch.full((n_f,), float("nan"), dtype=torch.float32, device=a.device)
    block_t = block_t or _pow2(n_t, 2, 16)  # 16 x 128 tile: two 16-byte loads per thread per tensor (bf16)
    block_d = block_d or _pow2(n_d, 16, 128)
    n_tb = triton.cdiv(n_t, block_t)
    part = torch.empty((n_f, n_tb), dtype=torch.float32, device=a.device)
    _frame_cosine_kernel[(n_f, n_tb)](
        a, b, part, n_t, n_d, n_tb, *a.stride(), *b.stride(), reference.EPS,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return part.sum(dim=1) / n_t


# ------------------------------------------------------------------------------------ window_argmax


@triton.jit
def _window_argmax_kernel(
    s_ptr, w_ptr, out_ptr,
    L, Wmax,
    s_n, s_l, w_s, o_n,
    BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_W windows of row n. Window j covers [start_j, start_j + size_j); the row's
    # largest window has q + 1 positions, scanned in BLOCK_S chunks as a (BLOCK_W, BLOCK_S) tile.
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w = tl.load(w_ptr + n * w_s).to(tl.int32)
    ws = tl.maximum(w, 1)
    q = L // ws
    r = L % ws
    start = j * q + tl.minimum(j, r)
    size = q + (j < r).to(tl.int32)
    live = j < w
    row = s_ptr + n * s_n
    best_v = tl.full([BLOCK_W], float("-inf"), dtype=tl.float32)
    best_i = start
    for s0 in range(0, q + 1, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = live[:, None] & (s[None, :] < size[:, None])
        x = tl.load(row + (start[:, None] + s[None, :]).to(tl.int64) * s_l, mask=m, other=float("-inf"))
        v, i = tl.max(x.to(tl.float32), axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = v > best_v  # strict: an earlier chunk keeps ties
        best_v = tl.where(better, v, best_v)
        best_i = tl.where(better, start + s0 + i, best_i)
    res = tl.where(live, best_i.to(tl.int64), -1)
    tl.store(out_ptr + n * o_n + j, res, mask=j < Wmax)


def window_argmax(scores: Tensor, windows: Tensor, *, block_w: int | None = None, block_s: int | None = None,
                  num_warps: int = 2) -> Tensor:  # fmt: skip
    wmax = reference.check_window_argmax(scores, windows)
    n, length = scores.shape
    out = torch.empty((n, wmax), dtype=torch.int64, device=scores.device)
    if n == 0 or wmax == 0:
        return out.fill_(-1)
    windows = windows.to(scores.device)
    # Typical window ~ L / wmax positions; longer windows loop over chunks.
    block_s = block_s or _pow2(triton.cdiv(length, wmax), 4, 64)
    block_w = block_w or _pow2(wmax, 16, max(16, 2048 // block_s))
    _window_argmax_kernel[(n, triton.cdiv(wmax, block_w))](
        scores, windows, out, length, wmax, *scores.stride(), windows.stride(0), out.stride(0),
        BLOCK_W=block_w, BLOCK_S=block_s, num_warps=num_warps,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------- scatter_mean


@triton.jit
def _scatter_mean_kernel(
    v_ptr, perm_ptr, off_ptr, base_ptr, out_ptr,
    D,
    sv_m, sv_d, sb_k, sb_d, so_k,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: group k, BLOCK_D features. The group's rows are perm[off[k]:off[k+1]] (index sorted
    # on the host); they are gathered BLOCK_M at a time so several row loads are in flight, summed in a
    # fixed order (deterministic), added to base[k] and divided once: one read of each input row, one
    # write of each output row, no atomics and no float32 scratch tensor.
    k = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    lo = tl.load(off_ptr + k)
    hi = tl.load(off_ptr + k + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i0 in range(lo, hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_ok = i < hi
        rows = tl.load(perm_ptr + i, mask=i_ok, other=0)
        x = tl.load(v_ptr + rows[:, None] * sv_m + d[None, :] * sv_d, mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    base = tl.load(base_ptr + k * sb_k + d * sb_d, mask=d_ok, other=0.0).to(tl.float32)
    mean = (base + tl.sum(acc, axis=0)) / (1 + hi - lo).to(tl.float32)
    tl.store(out_ptr + k * so_k + d, mean.to(out_ptr.dtype.element_ty), mask=d_ok)


def scatter_mean(values: Tensor, index: Tensor, base: Tensor, *, block_m: int = 4, block_d: int | None = None,
                 num_warps: int = 4) -> Tensor:  # fmt: skip
    reference.check_scatter_mean(values, index, base)
    n_k, n_d = base.shape
    out = torch.empty((n_k, n_d), dtype=base.dtype, device=base.device)
    if n_k == 0 or n_d == 0:
        return out
    index = index.to(device=base.device, dtype=torch.int64)
    # CSR layout of the groups: a stable sort keeps each group's rows in input order (a fixed summation
    # order); offsets by binary search. Indices outside [0, K) fall before off[0] or after off[K]: ignored.
    sorted_index, perm = torch.sort(index, stable=True)
    off = torch.searchsorted(sorted_index, torch.arange(n_k + 1, device=base.device, dtype=torch.int64))
    block_d = block_d or _pow2(n_d, 16, 512)
    _scatter_mean_kernel[(n_k, triton.cdiv(n_d, block_d))](
        values, perm, off, base, out, n_d, *values.stride(), *base.stride(), out.stride(0),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------- ahead-of-time compile (no GPU needed)


def _blocks_for_real_shapes() -> list[tuple[str, object, dict, dict, int, list[str]]]:
    """(name, kernel, signature, constexprs, num_warps, args Triton would mark 16-divisible) at EarlyTom's
    shapes, with the block sizes the wrappers above pick for them and the specialisations Triton's
    launcher would make for contiguous tensors (unit strides become constants)."""
    out = []
    t, d = 729, 1152  # SigLIP frames
    for dt in ("bf16", "fp32"):
        sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "part_ptr": "*fp32", "T": "i32", "D": "i32", "n_tblocks": "i32",
               "sa_f": "i32", "sa_t": "i32", "sa_d": "i32", "sb_f": "i32", "sb_t": "i32", "sb_d": "i32", "eps": "fp32"}  # fmt: skip
        consts = {"BLOCK_T": _pow2(t, 2, 16), "BLOCK_D": _pow2(d, 16, 128), "sa_d": 1, "sb_d": 1}
        div = ["a_ptr", "b_ptr", "part_ptr", "D", "sa_f", "sa_t", "sb_f", "sb_t"]
        out.append((f"frame_cosine[{dt}]", _frame_cosine_kernel, sig, consts, 4, div))
    length, wmax = 196, 40  # pooled 14x14 grid, static-frame windows
    for dt in ("fp32", "bf16"):
        sig = {"s_ptr": f"*{dt}", "w_ptr": "*i64", "out_ptr": "*i64", "L": "i32", "Wmax": "i32",
               "s_n": "i32", "s_l": "i32", "w_s": "i32", "o_n": "i32"}  # fmt: skip
        block_s = _pow2(triton.cdiv(length, wmax), 4, 64)
        consts = {"BLOCK_W": _pow2(wmax, 16, max(16, 2048 // block_s)), "BLOCK_S": block_s, "s_l": 1, "w_s": 1}
        out.append((f"window_argmax[{dt}]", _window_argmax_kernel, sig, consts, 2, ["s_ptr", "w_ptr", "out_ptr"]))
    for dt in ("bf16", "fp32"):
        for d in (896, 3584):  # Qwen2 hidden sizes of the 0.5B and 7B models
            sig = {"v_ptr": f"*{dt}", "perm_ptr": "*i64", "off_ptr": "*i64", "base_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                   "D": "i32", "sv_m": "i32", "sv_d": "i32", "sb_k": "i32", "sb_d": "i32", "so_k": "i32"}  # fmt: skip
            consts = {"BLOCK_M": 4, "BLOCK_D": _pow2(d, 16, 512), "sv_d": 1, "sb_d": 1}
            div = ["v_ptr", "perm_ptr", "off_ptr", "base_ptr", "out_ptr", "D", "sv_m", "sb_k", "so_k"]
            out.append((f"scatter_mean[{dt},D={d}]", _scatter_mean_kernel, sig, consts, 4, div))
    return out


def compile_report(arch: int = 90) -> list[dict]:
    """Compile every kernel for ``sm_<arch>`` with Triton's bundled ptxas (no GPU, no driver needed).

    Returns one dict per kernel variant: name, constexprs, num_warps, and from the PTX the count of
    vector global loads (``ld.global.v2/v4``), scalar global loads and atomics, and, where Triton's
    bundled ``cuobjdump`` is found, registers / local (spill) / shared bytes per thread block.
    Raises whatever the compiler raises: a kernel that the interpreter accepts but the GPU compiler
    rejects fails here. Uses Triton's AOT entry points (``ASTSource``, ``GPUTarget``), which are
    internal and may move between Triton versions.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_report needs the kernels compiled, not interpreted: unset TRITON_INTERPRET")
    try:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception:
        cuobjdump = None
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, kernel, sig, consts, num_warps, div in _blocks_for_real_shapes():
        sig = {**sig, **{c: "constexpr" for c in consts}}
        attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
            target=target,
            options={"num_warps": num_warps},
        )
        ptx = compiled.asm["ptx"]
        row = {
            "name": name,
            "constexprs": {k: v for k, v in consts.items() if k.isupper()},
            "num_warps": num_warps,
            "vector_loads": len(re.findall(r"ld\.global\S*\.v[24]\.", ptx)),
            "loads": len(re.findall(r"ld\.global", ptx)),
            "atomics": len(re.findall(r"\batom\.", ptx)),
        }
        if cuobjdump:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            for key, field in (("registers", "REG"), ("local_bytes", "LOCAL"), ("shared_bytes", "SHARED")):
                m = re.search(rf"\b{field}:(\d+)", usage)
                row[key] = int(m.group(1)) if m else None
        rows.append(row)
    return rows
