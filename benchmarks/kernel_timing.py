"""Time the Triton kernels of tokcomp.ops.kernels against their torch references at EarlyTom's shapes.

    python benchmarks/kernel_timing.py                    # CUDA: kernel vs reference; CPU: reference only
    python benchmarks/kernel_timing.py --repeats 200 --warmup 20
    python benchmarks/kernel_timing.py --compile-report   # also compile the kernels for sm_90 (no GPU needed)

On CUDA each case is checked first (kernel vs reference, relative error or exact equality), then each
implementation is warmed up and timed with CUDA events around every call, the L2 cache flushed
between calls (outside the timed region) so that small cases are not timed out of the cache; the
median is reported, with the bytes each case must move at least and the bandwidth that implies, and
a measured device-to-device copy bandwidth as the ceiling. On CPU there is no kernel to time: it
says so and times the torch reference (the CPU production path) with a host clock.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokcomp.ops import kernels  # noqa: E402


@dataclass
class Case:
    name: str
    args: tuple
    min_bytes: int  # each input read once, each output written once
    exact: bool = False


def cases(device: torch.device, seed: int = 0) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(seed)
    out = []

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    for dtype in (torch.bfloat16, torch.float32):  # SigLIP hidden states of 32 frames
        a, b = randn(32, 729, 1152, dtype=dtype), randn(32, 729, 1152, dtype=dtype)
        b = 0.8 * a + 0.2 * b  # similar frames, as in a video
        out.append(Case(f"frame_cosine 32x729x1152 {_short(dtype)}", (a, b), 2 * a.numel() * a.element_size() + 32 * 4))
    scores = torch.rand(32, 196, generator=g, device=device)  # pooled received attention, 32 frames
    windows = torch.randint(20, 41, (32,), generator=g, device=device)
    wmax = int(windows.max())
    out.append(Case("window_argmax 32x196 w=20..40 fp32", (scores, windows), scores.numel() * 4 + 32 * 8 + 32 * wmax * 8, True))
    for d, dtype in ((896, torch.bfloat16), (3584, torch.bfloat16), (3584, torch.float32)):  # Qwen2 0.5B / 7B
        m, k = 3000, 3000
        values, base = randn(m, d, dtype=dtype), randn(k, d, dtype=dtype)
        index = torch.randint(0, k, (m,), generator=g, device=device)
        size = values.element_size()
        out.append(Case(f"scatter_mean {m}->{k}x{d} {_short(dtype)}", (values, index, base), (m + 2 * k) * d * size + m * 8))
    return out


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _fn(case: Case, backend: str) -> Callable[[], torch.Tensor]:
    op = getattr(kernels, case.name.split()[0])
    return lambda: op(*case.args, backend=backend)


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int, flush: torch.Tensor | None) -> float:
    """Median milliseconds of one call, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()  # evict the inputs from L2 (not timed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_host(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check(case: Case, got: torch.Tensor, want: torch.Tensor) -> str:
    if case.exact:
        return "equal" if torch.equal(got, want) else f"DIFFER ({int((got != want).sum())} entries)"
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    return f"rel {err.item():.1e}"


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written over the median time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), 3, 10, None)
    return 2 * src.numel() / ms / 1e6


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def measure_cuda(warmup: int, repeats: int, flush_l2: bool = True) -> dict:
    """Every case checked (kernel vs reference) and timed; {"device", "copy_GBps", "cases": [...]}, times in us."""
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth_gbs()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    rows = []
    for case in cases(torch.device("cuda")):
        kernel, ref = _fn(case, "triton"), _fn(case, "torch")
        status = check(case, kernel(), ref())
        t_ref = time_cuda(ref, warmup, repeats, flush)
        t_ker = time_cuda(kernel, warmup, repeats, flush)
        rows.append({"case": case.name, "torch_us": t_ref * 1e3, "triton_us": t_ker * 1e3, "speedup": t_ref / t_ker,
                     "min_MB": case.min_bytes / 1e6, "floor_us": case.min_bytes / bw / 1e3,
                     "triton_GBps": case.min_bytes / t_ker / 1e6, "check": status})
    return {"device": f"{props.name}, {props.multi_processor_count} SMs", "copy_GBps": bw, "warmup": warmup,
            "repeats": repeats, "l2_flushed": flush_l2, "cases": rows}


def cuda_table(result: dict) -> str:
    rows = [[r["case"], f"{r['torch_us']:.1f}", f"{r['triton_us']:.1f}", f"x{r['speedup']:.2f}", f"{r['min_MB']:.3g}",
             f"{r['floor_us']:.2f}", f"{r['triton_GBps']:.0f}", r["check"]] for r in result["cases"]]
    return table(["case", "torch us", "triton us", "speedup", "min MB", "floor us", "triton GB/s", "check"], rows)


def run_cuda(args) -> None:
    if not kernels.triton_available():
        print("CUDA is available but Triton has no active driver: nothing to compare.")
        return
    result = measure_cuda(args.warmup, args.repeats, not args.no_flush)
    print(f"device: {result['device']}, torch {torch.__version__}")
    print(f"measured copy bandwidth: {result['copy_GBps']:.0f} GB/s (floor column = min bytes / this)")
    print(f"\nmedian of {args.repeats} calls after {args.warmup} warm-up, L2 flushed between calls: {not args.no_flush}")
    print("(whole public function: window_argmax includes its host sync for max(windows), scatter_mean its sort)")
    print(cuda_table(result))


def measure_cpu(warmup: int, repeats: int) -> dict:
    """The torch reference (the CPU production path) per case, host clock; times in ms."""
    rows = []
    for case in cases(torch.device("cpu")):
        assert kernels.select_backend(*case.args) == "torch"
        ms = time_host(_fn(case, "torch"), warmup, repeats)
        rows.append({"case": case.name, "torch_ms": ms, "min_MB": case.min_bytes / 1e6, "GBps": case.min_bytes / ms / 1e6})
    return {"device": "cpu", "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "cases": rows}


def cpu_table(result: dict) -> str:
    rows = [[r["case"], f"{r['torch_ms']:.2f}", f"{r['min_MB']:.3g}", f"{r['GBps']:.2g}"] for r in result["cases"]]
    return table(["case", "torch ms", "min MB", "GB/s"], rows)


def run_cpu(args) -> None:
    print("no CUDA GPU: the Triton kernels cannot be timed here (only checked, under TRITON_INTERPRET=1, by the")
    print(f"tests). Timing the torch reference, the CPU production path, with {torch.get_num_threads()} threads.")
    result = measure_cpu(args.cpu_warmup, args.cpu_repeats)
    print(f"\nmedian of {args.cpu_repeats} calls after {args.cpu_warmup} warm-up (host clock)")
    print(cpu_table(result))


def inputs_for(call: kernels.KernelCall, device: torch.device, g: torch.Generator) -> tuple:
    """Random inputs of a recorded call's sizes and dtypes (frame pairs made similar, as in a video)."""

    def randn(shape, dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(getattr(torch, dtype))

    if call.op == "frame_cosine":
        a = randn(call.shapes[0], call.dtypes[0])
        return a, (0.8 * a + 0.2 * randn(call.shapes[1], call.dtypes[1])).to(a.dtype)
    if call.op == "window_argmax":
        return randn(call.shapes[0], call.dtypes[0]), torch.tensor(call.windows, device=device)
    values, base = randn(call.shapes[0], call.dtypes[0]), randn(call.shapes[2], call.dtypes[2])
    index = torch.randint(0, max(1, call.shapes[2][0]), call.shapes[1], generator=g, device=device)
    return values, index, base


def measure_calls(calls: list[kernels.KernelCall], warmup: int, repeats: int, device: str, limit: int = 40) -> list[dict]:
    """Each distinct recorded call (op, sizes, dtypes), most frequent first, timed with both backends where
    Triton runs (CUDA) or with the torch reference alone (CPU); times in us."""
    counts: dict[tuple, int] = {}
    for c in calls:
        key = (c.op, c.shapes, c.dtypes, c.windows)
        counts[key] = counts.get(key, 0) + 1
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    cuda = dev.type == "cuda" and kernels.triton_available()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if cuda else None
    rows = []
    for (op, shapes, dtypes, windows), n in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]:
        args = inputs_for(kernels.KernelCall(op, "", shapes, dtypes, windows), dev, g)
        fn = getattr(kernels, op)
        row = {"op": op, "shapes": shapes, "dtypes": dtypes, "calls": n}
        torch_fn = functools.partial(fn, *args, backend="torch")
        if cuda:
            row["torch_us"] = 1e3 * time_cuda(torch_fn, warmup, repeats, flush)
            row["triton_us"] = 1e3 * time_cuda(functools.partial(fn, *args, backend="triton"), warmup, repeats, flush)
            row["speedup"] = row["torch_us"] / row["triton_us"]
        else:
            row["torch_us"] = 1e3 * time_host(torch_fn, warmup, repeats)
        rows.append(row)
    return rows


def calls_table(rows: list[dict]) -> str:
    headers = ["op", "shapes", "dtype", "calls", "torch us"] + (["triton us", "speedup"] if rows and "speedup" in rows[0] else [])
    body = [[r["op"], " ".join("x".join(map(str, sh)) for sh in r["shapes"]), r["dtypes"][0], str(r["calls"]),
             f"{r['torch_us']:.1f}"] + ([f"{r['triton_us']:.1f}", f"x{r['speedup']:.2f}"] if "speedup" in r else [])
            for r in rows]
    return table(headers, body)


def run_compile_report() -> None:
    from tokcomp.ops.kernels import triton_impl

    print("\nahead-of-time compile for sm_90 (Triton's bundled ptxas; no GPU involved)")
    rows = []
    for r in triton_impl.compile_report(90):
        blocks = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        rows.append([
            r["name"], blocks, str(r["num_warps"]), str(r.get("registers", "?")), str(r.get("local_bytes", "?")),
            f"{r['vector_loads']}/{r['loads']}", str(r["atomics"]),
        ])  # fmt: skip
    print(table(["kernel", "blocks", "warps", "regs", "local B", "vec/all loads", "atomics"], rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=10, help="CUDA warm-up calls per case")
    p.add_argument("--repeats", type=int, default=100, help="CUDA timed calls per case")
    p.add_argument("--cpu-warmup", type=int, default=1)
    p.add_argument("--cpu-repeats", type=int, default=5)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between timed calls")
    p.add_argument("--compile-report", action="store_true", help="also compile the kernels for sm_90 and report")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        run_cuda(args)
    else:
        run_cpu(args)
    if args.compile_report:
        run_compile_report()


if __name__ == "__main__":
    main()
