"""Hot-operation kernels: torch references on hand-computed cases, the dispatcher, and the Triton
kernels against the references under Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates, and other tests of this process may
import the kernel module without it, so the kernel checks run this file as a script in a fresh
process with ``TRITON_INTERPRET=1`` (see ``kernel_checks`` at the bottom; on a GPU it runs compiled). Run by hand:
``TRITON_INTERPRET=1 python tests/test_kernels.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tokcomp.ops import kernels
from tokcomp.ops.kernels import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]


def naive_window_argmax(scores: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Loop oracle written straight from the definition."""
    n, length = scores.shape
    wmax = int(windows.max()) if n else 0
    out = torch.full((n, wmax), -1, dtype=torch.int64)
    for row in range(n):
        w = int(windows[row])
        start = 0
        for j in range(w):
            size = length // w + (1 if j < length % w else 0)
            seg = scores[row, start : start + size].float().tolist()
            out[row, j] = start + seg.index(max(seg))  # list.index: first maximum
            start += size
        assert start == length or w == 0
    return out


def naive_scatter_mean(values, index, base):
    out = []
    for k in range(base.shape[0]):
        rows = [values[m].double() for m in range(values.shape[0]) if int(index[m]) == k]
        out.append((base[k].double() + sum(rows, torch.zeros_like(base[k], dtype=torch.float64))) / (1 + len(rows)))
    return torch.stack(out) if out else base.double()


# ------------------------------------------------------------------------------ references, by hand


def test_frame_cosine_hand_computed():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [0.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0], [-1.0, 1.0]], [[6.0, 8.0], [1.0, 2.0]]])
    # frame 0: cos 1 (parallel) and 0 (orthogonal); frame 1: cos 1 and 0 (zero vector, eps-clamped norm)
    out = reference.frame_cosine(a, b)
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5]))
    assert kernels.frame_cosine(-a, a)[0].item() == pytest.approx(-1.0)


def test_frame_cosine_matches_torch_cosine_similarity_and_broadcast_views():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 13, 24, generator=g, dtype=torch.float64).to(torch.bfloat16)
    consecutive = reference.frame_cosine(h[:-1], h[1:])
    expected = F.cosine_similarity(h[:-1].float(), h[1:].float(), dim=-1).mean(-1)
    torch.testing.assert_close(consecutive, expected)
    assert consecutive.dtype == torch.float32
    to_ref = reference.frame_cosine(h[:1].expand(5, -1, -1), h)  # segment reference frame vs all frames
    assert to_ref[0].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isnan(reference.frame_cosine(torch.ones(2, 0, 3), torch.ones(2, 0, 3))).all()
    with pytest.raises(ValueError):
        reference.frame_cosine(torch.ones(2, 3, 4), torch.ones(2, 3, 5))


def test_window_argmax_hand_computed():
    # L = 7, 3 windows: sizes 3, 2, 2 -> [0, 1, 2], [3, 4], [5, 6]
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.9, 0.2, 0.2, 0.5, 0.7],  # tie at 1 and 2 -> 1; tie 3/4 -> 3; 6
            [5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 0.0],  # 2 windows: sizes 4, 3 -> [0..3] -> 0, [4..6] -> 5
            [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],  # 7 windows of one -> identity
            [-float("inf")] * 7,  # one window, all -inf -> first position
        ]
    )
    windows = torch.tensor([3, 2, 7, 1])
    expected = torch.tensor(
        [
            [1, 3, 6, -1, -1, -1, -1],
            [0, 5, -1, -1, -1, -1, -1],
            [0, 1, 2, 3, 4, 5, 6],
            [0, -1, -1, -1, -1, -1, -1],
        ]
    )
    out = reference.window_argmax(scores, windows)
    assert out.dtype == torch.int64
    assert torch.equal(out, expected)
    assert torch.equal(kernels.window_argmax(scores, windows.int()), expected)  # any integer dtype
    # a row with no windows is all padding; the width is max(windows)
    assert torch.equal(reference.window_argmax(scores[:2], torch.tensor([0, 2])), torch.tensor([[-1, -1], [0, 5]]))
    assert reference.window_argmax(scores[:2], torch.tensor([0, 0])).shape == (2, 0)


def test_window_argmax_reference_matches_loop_oracle():
    g = torch.Generator().manual_seed(1)
    for length, n in ((1, 3), (7, 5), (23, 6), (196, 8)):
        scores = torch.randint(0, 4, (n, length), generator=g).float()  # many ties
        windows = torch.randint(0, length + 1, (n,), generator=g)
        windows[0] = length
        assert torch.equal(reference.window_argmax(scores, windows), naive_window_argmax(scores, windows))


def test_window_argmax_rejects_bad_windows():
    with pytest.raises(ValueError):
        reference.window_argmax(torch.zeros(2, 5), torch.tensor([1, 6]))
    with pytest.raises(ValueError):
        reference.window_argmax(torch.zeros(2, 5), torch.tensor([-1, 2]))
    with pytest.raises(TypeError):
        reference.window_argmax(torch.zeros(2, 5), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        reference.window_argmax(torch.zeros(2, 5), torch.tensor([1, 2, 3]))


def test_scatter_mean_hand_computed():
    base = torch.tensor([[0.0, 1.0], [10.0, 0.0], [4.0, 4.0]])
    values = torch.tensor([[2.0, 1.0], [4.0, 1.0], [6.0, 2.0]])
    index = torch.tensor([0, 0, 1])
    out = reference.scatter_mean(values, index, base)
    # k=0: (0+2+4)/3, (1+1+1)/3; k=1: (10+6)/2, (0+2)/2; k=2 receives nothing: itself.
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0], [8.0, 1.0], [4.0, 4.0]]))
    # A true mean, not HoliTom's sequential pairwise average ((0+2)/2+4)/2 = 2.5.
    assert out[0, 0].item() == 2.0
    assert torch.equal(reference.scatter_mean(values[:0], index[:0], base), base)  # nothing merged
    assert reference.scatter_mean(values, index, base.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="out of bounds"):
        reference.scatter_mean(values, torch.tensor([0, 3, 1]), base)
    with pytest.raises(ValueError):
        reference.scatter_mean(values, index, base[:, :1])


def test_scatter_mean_reference_matches_loop_oracle():
    g = torch.Generator().manual_seed(2)
    values, base = torch.randn(40, 9, generator=g), torch.randn(11, 9, generator=g)
    index = torch.randint(0, 6, (40,), generator=g)  # groups 6..10 stay empty
    torch.testing.assert_close(reference.scatter_mean(values, index, base).double(), naive_scatter_mean(values, index, base))


# ------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    x = torch.zeros(2, 3, 4)
    assert kernels.select_backend(x, x) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: True)  # even with a GPU driver present
    assert kernels.select_backend(x, x) == "torch"
    assert kernels.select_backend(torch.zeros(2, device="meta")) == "torch"
    assert kernels.select_backend(x, backend="torch") == "torch"
    called = []
    monkeypatch.setattr(kernels, "_impl", lambda: called.append(1))
    kernels.frame_cosine(x, x)
    kernels.window_argmax(torch.zeros(2, 5), torch.tensor([2, 3]))
    kernels.scatter_mean(torch.zeros(3, 4), torch.tensor([0, 1, 0]), torch.zeros(2, 4))
    assert not called


def test_dispatcher_rule_for_cuda_tensors(monkeypatch):
    """The selection rule itself, with stand-ins for CUDA tensors (no GPU here)."""
    cuda, cpu = SimpleNamespace(is_cuda=True, requires_grad=False), SimpleNamespace(is_cuda=False, requires_grad=False)
    grad = SimpleNamespace(is_cuda=True, requires_grad=True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.select_backend(cuda, cuda) == "triton"
    assert kernels.select_backend(cuda, cpu) == "torch"  # mixed devices: the reference sorts it out
    assert kernels.select_backend(cuda, grad) == "torch"  # kernels have no backward
    with torch.no_grad():
        assert kernels.select_backend(cuda, grad) == "triton"
    assert kernels.select_backend(cuda, backend="torch") == "torch"
    with pytest.raises(ValueError, match="mix"):
        kernels.select_backend(cuda, cpu, backend="triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)  # CUDA but no usable Triton
    assert kernels.select_backend(cuda, cuda) == "torch"
    with pytest.raises(RuntimeError, match="driver"):
        kernels.select_backend(cuda, backend="triton")


def test_record_calls_lists_each_dispatched_call_with_its_sizes():
    a, scores, values = torch.zeros(3, 5, 4, dtype=torch.bfloat16), torch.rand(2, 9), torch.rand(6, 4)
    kernels.frame_cosine(a, a)  # outside any block: not recorded anywhere
    with kernels.record_calls() as outer:
        kernels.frame_cosine(a[:1].expand(3, -1, -1), a)
        with kernels.record_calls() as inner:
            kernels.window_argmax(scores, torch.tensor([2, 3]))
        kernels.scatter_mean(values, torch.tensor([0, 1, 0, 2, 2, 2]), torch.zeros(3, 4))
    kernels.scatter_mean(values, torch.zeros(6, dtype=torch.long), torch.zeros(1, 4))
    assert [c.op for c in outer] == ["frame_cosine", "window_argmax", "scatter_mean"]
    assert inner == [outer[1]]
    assert outer[0] == kernels.KernelCall("frame_cosine", "torch", ((3, 5, 4), (3, 5, 4)), ("bfloat16", "bfloat16"))
    assert outer[1].windows == (2, 3) and outer[1].shapes == ((2, 9), (2,))
    assert outer[2].shapes == ((6, 4), (6,), (3, 4)) and outer[2].dtypes == ("float32", "int64", "float32")
    assert not kernels._recorders


def test_earlytom_run_uses_every_kernel_and_records_it(tiny, pixels):
    """What benchmarks/gpu_check.py relies on to time the kernels at the sizes a run uses."""
    from tests.conftest import run_with
    from tokcomp.plugins import Plugins

    plugins = Plugins()
    strategies = [plugins.strategy("earlytom.frame_merge").from_params({"layers": [1, 2]}),
                  plugins.strategy("earlytom.decoupled_select").from_params({"ratio": 0.25, "score_layer": -1})]
    with kernels.record_calls() as calls:
        run_with(tiny, pixels, strategies, max_new_tokens=1)
    assert {c.op for c in calls} >= {"frame_cosine", "window_argmax"}
    assert all(c.backend == "torch" for c in calls)  # CPU tensors here


def test_dispatcher_backend_names_and_forcing(monkeypatch):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend"):
        kernels.select_backend(x, backend="cuda")
    with pytest.raises(ValueError):
        kernels.select_backend(x, backend="bogus")
    assert kernels.select_backend(x, backend="torch") == "torch"
    assert kernels.select_backend(x) == "torch"  # automatic on CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.select_backend(x, backend="triton")  # Triton forced on CPU without the interpreter


def test_no_gpu_driver_here_means_no_triton():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert kernels.triton_available() is False


# ------------------------------------------------------------------ Triton kernels (interpreter, subprocess)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_match_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert "interpreter checks passed" in proc.stdout, proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_kernels_match_reference_on_cuda():
    """The same checks compiled for the GPU (benchmarks/gpu_check.py runs this file on one)."""
    if not (torch.cuda.is_available() and kernels.triton_available()):
        pytest.skip("no CUDA GPU with an active Triton driver here")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    assert kernel_checks("cuda") > 30
    x = torch.ones(2, 3, 4, device="cuda")
    assert kernels.select_backend(x, x) == "triton"  # the production path on CUDA is the kernel


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_kernels_compile_for_hopper():
    """Ahead-of-time compile for sm_90 with Triton's bundled ptxas: catches what the interpreter accepts
    but the GPU compiler rejects, and pins the memory-access design (vector loads, no atomics, no spills)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    from tokcomp.ops.kernels import triton_impl

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no AOT entry points")
    rows = {r["name"]: r for r in triton_impl.compile_report(90)}
    assert len(rows) == 8
    for r in rows.values():
        assert r["atomics"] == 0, r
        if r.get("local_bytes") is not None:
            assert r["local_bytes"] == 0, r  # nothing spilled to local memory
    for name in ("frame_cosine[bf16]", "frame_cosine[fp32]", "scatter_mean[bf16,D=3584]", "scatter_mean[fp32,D=896]"):
        assert rows[name]["vector_loads"] > 0, rows[name]  # 8- or 16-byte loads on the streaming paths



def kernel_checks(device: str = "cpu") -> int:
    """Every Triton kernel against its reference (fp32/bf16/fp16, odd shapes, strided and broadcast views,
    empty inputs), on ``device``: "cpu" under Triton's interpreter (``TRITON_INTERPRET=1``), "cuda" compiled
    for the GPU. Inputs are drawn on the CPU and moved, so both devices check the same numbers. Returns the
    number of checks."""
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
        assert "tokcomp.ops.kernels.triton_impl" not in sys.modules  # the package imports it lazily
    from tokcomp.ops.kernels import triton_impl as tri

    assert tri.INTERPRET == (device == "cpu")
    g = torch.Generator().manual_seed(0)
    n = 0

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def randint(low, high, shape):
        return torch.randint(low, high, shape, generator=g).to(device)

    def tensor(data):
        return torch.tensor(data, device=device)

    def _check(name, got, want, **tol):
        assert got.device.type == torch.device(device).type, f"{name}: result on {got.device}, inputs on {device}"
        got, want = got.cpu(), want.cpu()
        if want.dtype in (torch.int64, torch.int32):
            assert torch.equal(got, want), f"{name}: {got} != {want}"
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
            torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)
        print(f"ok {name} ({device})")

    # frame_cosine: odd T and D, D over several BLOCK_D chunks, low precision, strided and broadcast views
    for f, t, d, dtype in ((1, 1, 1, torch.float32), (3, 37, 70, torch.float32), (2, 29, 300, torch.bfloat16),
                           (4, 17, 130, torch.float16), (2, 64, 128, torch.float32)):  # fmt: skip
        a, b = rand(f, t, d, dtype=dtype), rand(f, t, d, dtype=dtype)
        tol = {} if dtype == torch.float32 else {"atol": 1e-5, "rtol": 1e-4}  # same inputs, fp32 math both sides
        _check(f"frame_cosine {f}x{t}x{d} {dtype}", kernels.frame_cosine(a, b, backend="triton"), reference.frame_cosine(a, b), **tol)
        n += 1
    h = rand(6, 21, 45)
    h[2, 3] = 0  # a zero token: eps-clamped norm, cosine 0
    _check("frame_cosine consecutive views", kernels.frame_cosine(h[:-1], h[1:], backend="triton"), reference.frame_cosine(h[:-1], h[1:]))
    ref = h[:1].expand(6, -1, -1)
    _check("frame_cosine expanded reference", kernels.frame_cosine(ref, h, backend="triton"), reference.frame_cosine(ref, h))
    ht = rand(3, 40, 19).transpose(1, 2)  # (3, 19, 40), non-unit stride on D
    _check("frame_cosine transposed", kernels.frame_cosine(ht, ht.flip(0), backend="triton"), reference.frame_cosine(ht, ht.flip(0)))
    near = h + 1e-3 * rand(6, 21, 45)
    _check("frame_cosine near-identical", kernels.frame_cosine(h, near, backend="triton"), reference.frame_cosine(h, near))
    empty = torch.ones(2, 0, 4, device=device)
    _check("frame_cosine T=0", kernels.frame_cosine(empty, empty, backend="triton"), reference.frame_cosine(empty, empty))
    _check("frame_cosine small blocks", tri.frame_cosine(h, near, block_t=4, block_d=16), reference.frame_cosine(h, near))
    n += 6

    # window_argmax: integer-valued scores give many ties; windows 0, 1, L and in between
    for rows, length in ((3, 1), (5, 7), (6, 23), (32, 196), (4, 130)):
        scores = randint(0, 3, (rows, length)).float()
        windows = randint(0, length + 1, (rows,))
        windows[0] = length
        windows[-1] = 1
        want = reference.window_argmax(scores, windows)
        assert torch.equal(want.cpu(), naive_window_argmax(scores.cpu(), windows.cpu()))
        _check(f"window_argmax {rows}x{length}", kernels.window_argmax(scores, windows, backend="triton"), want)
        n += 1
    scores = rand(32, 196)
    windows = randint(20, 41, (32,))  # EarlyTom static frames
    want = reference.window_argmax(scores, windows)
    _check("window_argmax EarlyTom shape", kernels.window_argmax(scores, windows, backend="triton"), want)
    _check("window_argmax bf16", kernels.window_argmax(scores.bfloat16(), windows, backend="triton"),
           reference.window_argmax(scores.bfloat16(), windows))  # fmt: skip
    _check("window_argmax fp16", kernels.window_argmax(scores.half(), windows, backend="triton"),
           reference.window_argmax(scores.half(), windows))  # fmt: skip
    _check("window_argmax int32 windows", kernels.window_argmax(scores, windows.int(), backend="triton"), want)
    st = rand(196, 32).t()  # strided rows
    _check("window_argmax strided", kernels.window_argmax(st, windows, backend="triton"), reference.window_argmax(st, windows))
    tied = randint(0, 2, (5, 50)).float()
    tw = tensor([1, 2, 3, 50, 17])
    # tiny blocks: windows over several BLOCK_W programs, long windows over several BLOCK_S chunks
    _check("window_argmax small blocks", tri.window_argmax(tied, tw, block_w=4, block_s=4), naive_window_argmax(tied.cpu(), tw.cpu()))
    _check("window_argmax all-inf row", kernels.window_argmax(torch.full((2, 9), -float("inf"), device=device), tensor([2, 4]), backend="triton"),
           torch.tensor([[0, 5, -1, -1], [0, 3, 5, 7]]))  # fmt: skip
    _check("window_argmax no windows", kernels.window_argmax(scores[:2], tensor([0, 0]), backend="triton"), want[:2, :0])
    n += 8

    # scatter_mean: empty groups, one crowded group, D not a power of two, bf16, strided values
    for m, k, d, dtype in ((0, 5, 7, torch.float32), (1, 1, 1, torch.float32), (40, 12, 33, torch.float32),
                           (60, 9, 130, torch.bfloat16), (30, 25, 600, torch.float32), (25, 7, 70, torch.float16)):  # fmt: skip
        values, base = rand(m, d, dtype=dtype), rand(k, d, dtype=dtype)
        index = randint(0, max(1, k // 2), (m,))  # upper half of the groups stays empty
        # one rounding of the output to bf16 / fp16
        tol = {torch.float32: {}, torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}[dtype]
        _check(f"scatter_mean {m}->{k}x{d} {dtype}", kernels.scatter_mean(values, index, base, backend="triton"),
               reference.scatter_mean(values, index, base), **tol)  # fmt: skip
        n += 1
    values, base = rand(50, 24), rand(6, 24)
    crowd = torch.zeros(50, dtype=torch.int64, device=device)
    crowd[::7] = 5
    want = reference.scatter_mean(values, crowd, base)
    _check("scatter_mean crowded group", kernels.scatter_mean(values, crowd, base, backend="triton"), want)
    _check("scatter_mean small blocks", tri.scatter_mean(values, crowd, base, block_m=2, block_d=16), want)
    vt = rand(24, 50).t()
    _check("scatter_mean strided values", kernels.scatter_mean(vt, crowd, base, backend="triton"), reference.scatter_mean(vt, crowd, base))
    mixed = tri.scatter_mean(values.bfloat16(), crowd, base)  # values' dtype may differ from base's
    _check("scatter_mean bf16 values into fp32 base", mixed, reference.scatter_mean(values.bfloat16(), crowd, base))
    bad = crowd.clone()
    bad[:3] = tensor([-1, 6, 99])  # out of range: the kernel ignores those rows
    keep = (bad >= 0) & (bad < 6)
    _check("scatter_mean ignores out-of-range", tri.scatter_mean(values, bad, base), reference.scatter_mean(values[keep], bad[keep], base))
    n += 5
    return n


if __name__ == "__main__":
    count = kernel_checks("cpu")
    print(f"interpreter checks passed: {count}")
