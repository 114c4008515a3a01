"""Time HoliTom's global temporal segmentation (the static-window DP) at LLaVA-OV video shapes.

    python benchmarks/holitom_dp.py                      # T = 32 and 64, P = 196, D = 896, CUDA if present
    python benchmarks/holitom_dp.py --ttft               # also measure a real TTFT to compare with (see below)
    python benchmarks/holitom_dp.py --device cpu --repeats 20

What is timed, per shape, on synthetic video-like features (shots of frames in which most positions
drift slowly and the rest change), the median of ``--repeats`` calls after ``--warmup``, synchronised:

- ``ours``: ``tokcomp.ops.static_windows.static_windows`` on the (T-1, P) similarity (gain table
  vectorised on the device, one transfer, T host steps of a vectorised max), and its parts;
- ``similarity``: the (T-1, P) cosine similarity it starts from (shared by every variant);
- ``ref_table``: the official shape: the static counts vectorised (cumulative products per start),
  then a Python O(T * W) double loop reading the table entry by entry (each read a device sync on CUDA);
- ``ref_python``: a plain pure-Python reference: indicator to lists, windows and DP in Python loops.

Both references run the official loop order (the one-frame window first, then lengths 2, 3, ...,
replaced only on a strict ``>``, so ties keep the shortest last window). All variants must find the
same optimum and the same windows, ties included (checked). ``whole outer_merge hook`` times the complete
pre-LLM stage (similarity, DP, static merging and clustering, dynamic top-k, token replacement) on
the same features with random attention. The share of TTFT is printed against ``--ttft-ms`` or an
assumed figure for the device (``ASSUMED_TTFT_MS``, labelled so), both scaled by T/32, or, with
``--ttft``, against the TTFT measured here by running LLaVA-OV-0.5B dimensions (random weights,
bf16) with ``holitom.outer_merge`` (ratio 0.1) on T frames of the generated clip, which also reports
the whole outer stage's token-processing time. No asserts on speed: numbers only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokcomp.ops import static_windows as sw  # noqa: E402

# Assumed TTFT of LLaVA-OV-0.5B at 32 frames (vision dominates, so it is scaled by T / 32):
# CUDA: ~20.5 TFLOPs of SigLIP (320 GMAC per frame) at ~400 TFLOP/s bf16 on an H100/H200-class GPU,
#       plus a short LLM prefill: ~60 ms, a low (so conservative) figure; an A100 takes about twice that.
# CPU:  specs/platform-notes.md, 2 cores, bf16, random weights: 32 frames end to end ~47 s.
ASSUMED_TTFT_MS = {"cuda": 60.0, "cpu": 47000.0}


def video_features(frames: int, positions: int, dim: int, device: torch.device, dtype: torch.dtype,
                   seed: int = 0, shots: int = 4, static_share: float = 0.6) -> torch.Tensor:
    """(T, P, D): per shot a base; a static position is its base plus a little noise in every frame
    (similarity about 0.93 between frames), a dynamic one mostly new content (about 0.35)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cuts = sorted(torch.randperm(frames - 1, generator=g)[: shots - 1].add(1).tolist())
    out = torch.empty(frames, positions, dim)
    for start, end in zip([0, *cuts], [*cuts, frames], strict=True):
        base = torch.randn(positions, dim, generator=g)
        static = torch.rand(positions, generator=g) < static_share
        for t in range(start, end):
            noise = torch.where(static[:, None], 0.27, 1.35) * torch.randn(positions, dim, generator=g)
            out[t] = base + noise
    return out.to(device=device, dtype=dtype)


def ref_table(feature_sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """Vectorised static counts (a cumulative product over each window start), Python DP loop over it."""
    indicator = (feature_sim > tau).long()
    frames = indicator.shape[0] + 1
    counts = torch.zeros(frames, frames, dtype=torch.long, device=feature_sim.device)  # [s, e]
    for s in range(frames - 1):
        counts[s, s + 1 :] = torch.cumprod(indicator[s:], dim=0).sum(dim=1)
    best, start = [0] * (frames + 1), [0] * frames
    for e in range(frames):
        best[e + 1], start[e] = best[e], e  # the one-frame window first, as the official loop
        for s in range(e - 1, max(0, e - max_window + 1) - 1, -1):  # then lengths 2, 3, ...
            value = best[s] + int(counts[s, e]) * (e - s)  # one device read per window
            if value > best[e + 1]:  # strict: among equal totals the shortest window stays
                best[e + 1], start[e] = value, s
    return _trace(start), best[frames]


def ref_python(feature_sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """Everything in Python: the indicator as lists, each window's count by a running AND."""
    rows = (feature_sim > tau).tolist()
    frames = len(rows) + 1
    positions = len(rows[0]) if rows else 0
    gain = [[0] * frames for _ in range(frames)]  # [s][e]
    for s in range(frames):
        alive = [True] * positions
        for e in range(s + 1, min(frames, s + max_window)):
            alive = [a and b for a, b in zip(alive, rows[e - 1], strict=True)]
            gain[s][e] = sum(alive) * (e - s)
    best, start = [0] * (frames + 1), [0] * frames
    for e in range(frames):
        best[e + 1], start[e] = best[e], e  # the one-frame window first, then lengths 2, 3, ...
        for s in range(e - 1, max(0, e - max_window + 1) - 1, -1):
            value = best[s] + gain[s][e]
            if value > best[e + 1]:  # strict, as the official loop: ties keep the shortest window
                best[e + 1], start[e] = value, s
    return _trace(start), best[frames]


def _trace(start: list[int]) -> list[tuple[int, int]]:
    windows, e = [], len(start) - 1
    while e >= 0:
        windows.append((start[e], e))
        e = start[e] - 1
    return windows[::-1]


def ours(feature_sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    windows, total, _ = sw.static_windows(feature_sim, tau, max_window)
    return windows, total


def gains_only(feature_sim: torch.Tensor, tau: float) -> torch.Tensor:
    gains = sw.window_gains(sw.static_run_lengths(feature_sim > tau))
    return gains.cpu()


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def outer_merge_stage(x: torch.Tensor, ratio: float, tau: float) -> Callable[[], object]:
    """A call of the whole ``holitom.outer_merge`` pre-LLM hook on tokens built from x (T, P, D),
    square grid, random attention scores (the tokens are rebuilt on every call). Content tokens only,
    as the pipeline hands them over: the framework keeps LLaVA's newline itself."""
    from tokcomp.strategies.holitom import OuterMerge

    from tokcomp.state import VisualTokens

    frames, positions, dim = x.shape
    side = int(positions**0.5)
    n, dev = frames * positions, x.device
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(dev)
    cells = torch.arange(positions, device=dev).repeat(frames)
    features = x.reshape(-1, dim)
    strategy = OuterMerge(ratio=ratio, tau=tau)

    def call() -> None:
        tokens = VisualTokens(
            features=features, frame=torch.arange(frames, device=dev).repeat_interleave(positions),
            row=cells // side, col=cells % side, source=torch.arange(n, device=dev),
            frame_sources=[[t] for t in range(frames)], grid=(side, side), scores=scores)
        strategy.tokcomp_pre_llm(tokens)

    return call


def measured_ttft(frames: int, device: torch.device, repeats: int) -> dict[str, float]:
    """TTFT of LLaVA-OV-0.5B dimensions (random weights, bf16) with holitom.outer_merge at ratio 0.1."""
    from types import SimpleNamespace

    from tokcomp.strategies.holitom import OuterMerge

    from tokcomp.pipeline import run
    from tokcomp.plugins import Plugins
    from tokcomp.stack import CompressionStack
    from tokcomp.video import generate_video, uniform_frame_indices

    spec = SimpleNamespace(weights="random", dtype="bfloat16", device=str(device), attn_implementation="sdpa",
                           image_size=None, seed=0)
    adapter = Plugins().model("llava-onevision-0.5b").build(spec)
    clip, _ = generate_video(length=max(96, frames), height=128, width=128, shots=4, seed=1)
    video = adapter.preprocess(clip[uniform_frame_indices(clip.shape[0], frames)])
    info = adapter.info.for_video(video.grid, video.llm_grid)  # the grids of this run's video
    runs = []
    for configuration in ([], [OuterMerge(ratio=0.1)]):
        stack = CompressionStack(configuration, info)
        try:
            timings = [run(adapter, video, "Describe what's happening in this video.", stack, max_new_tokens=1,
                           min_new_tokens=1).timings_ms for _ in range(repeats + 1)][1:]
        finally:
            stack.close()
        runs.append({key: statistics.median(t[key] for t in timings) for key in timings[0]})
    return {"ttft_none_ms": runs[0]["ttft_ms"], "ttft_holitom_ms": runs[1]["ttft_ms"],
            "holitom_token_processing_ms": runs[1]["token_processing_ms"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--positions", type=int, default=196)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--max-window", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ttft-ms", type=float, default=None,
                        help="TTFT at 32 frames to compare with when --ttft is not given, scaled by T/32 "
                             f"(default: assumed, {ASSUMED_TTFT_MS['cuda']:.0f} ms on CUDA, "
                             f"{ASSUMED_TTFT_MS['cpu']:.0f} ms on CPU; see ASSUMED_TTFT_MS)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ttft", action="store_true", help="measure TTFT with the real model dimensions")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, features {str(dtype).split('.')[-1]}, P={args.positions}, D={args.dim}, "
          f"tau={args.tau}, max_window={args.max_window}, median of {args.repeats}")
    for frames in args.frames:
        bench_shape(frames, args, device, dtype)


def bench_shape(frames: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    x = video_features(frames, args.positions, args.dim, device, dtype)
    sim = sw.consecutive_similarity(x)
    results = {f.__name__: f(sim, args.tau, args.max_window) for f in (ours, ref_table, ref_python)}
    totals = {k: v[1] for k, v in results.items()}
    if len(set(totals.values())) != 1:
        raise SystemExit(f"T={frames}: the variants disagree on the optimum: {totals}")
    if any(v[0] != results["ours"][0] for v in results.values()):
        raise SystemExit(f"T={frames}: the variants disagree on the windows: "
                         f"{ {k: v[0] for k, v in results.items()} }")
    windows = results["ours"][0]
    print(f"\nT={frames}: {len(windows)} windows, total_reduced={totals['ours']} "
          f"of {frames * args.positions} tokens; same windows in every variant (ties included)")
    slow = max(3, args.repeats // 4)
    times = {
        "similarity": median_ms(lambda: sw.consecutive_similarity(x), device, args.warmup, args.repeats),
        "ours": median_ms(lambda: ours(sim, args.tau, args.max_window), device, args.warmup, args.repeats),
        "ours: gain table + transfer": median_ms(lambda: gains_only(sim, args.tau), device, args.warmup,
                                                 args.repeats),
        "ref_table": median_ms(lambda: ref_table(sim, args.tau, args.max_window), device, 1, slow),
        "ref_python": median_ms(lambda: ref_python(sim, args.tau, args.max_window), device, 1, slow),
        "whole outer_merge hook (r=0.1)": median_ms(outer_merge_stage(x, 0.1, args.tau), device, 1, slow),
    }
    if args.ttft_ms is not None:
        ttft, label = args.ttft_ms * frames / 32, "given, scaled by T/32"
    else:
        ttft, label = ASSUMED_TTFT_MS[device.type] * frames / 32, f"assumed for {device.type}, see ASSUMED_TTFT_MS"
    if args.ttft:
        measured = measured_ttft(frames, device, repeats=3)
        ttft, label = measured["ttft_holitom_ms"], "measured, OV-0.5B dims + holitom.outer_merge r=0.1"
        print(f"  TTFT measured: no compression {measured['ttft_none_ms']:.1f} ms, with holitom.outer_merge "
              f"{measured['ttft_holitom_ms']:.1f} ms, of which the outer stage's token processing "
              f"{measured['holitom_token_processing_ms']:.2f} ms")
    print(f"  TTFT to compare with: {ttft:.0f} ms ({label})")
    for key, ms in times.items():
        ratio = "" if key in ("similarity", "ours: gain table + transfer") else f"  x{ms / times['ours']:.1f} of ours"
        extra = f"{ratio}  {100 * ms / ttft:.4f}% of TTFT"
        print(f"  {key:<30} {ms:9.3f} ms{extra}")

if __name__ == "__main__":
    main()
