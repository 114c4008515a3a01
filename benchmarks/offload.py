"""EarlyTom stage 2 with and without the CPU offload of static-frame selection (paper Sec. 3.3).

Times the pre-LLM selection alone at real LLaVA-OneVision shapes (pooled 14x14 grid, LLM width),
on the device given (default: cuda if available, else cpu), median over repeats after warm-up.
    python benchmarks/offload.py [--frames 32] [--ratio 0.2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tokcomp.strategies.earlytom import DecoupledSelect

from tokcomp.state import VisualTokens


def make_tokens(frames: int, dim: int, device: str, segments: list[tuple[int, int]]) -> VisualTokens:
    """The pre-LLM tokens of ``frames`` 14x14 grids (content only: the framework keeps the newline)."""
    n = frames * 196
    cells = torch.arange(196).repeat(frames)
    frame = torch.arange(frames).repeat_interleave(196)
    return VisualTokens(
        features=torch.randn(n, dim, device=device, dtype=torch.bfloat16),
        frame=frame.to(device), row=(cells // 14).to(device), col=(cells % 14).to(device),
        source=torch.arange(n, device=device), frame_sources=[[f] for f in range(frames)], grid=(14, 14),
        scores=torch.rand(n, device=device), meta={"earlytom.segments": segments, "earlytom.input_frames": frames},
    )


def time_select(strategy: DecoupledSelect, frames: int, dim: int, device: str, repeats: int) -> float:
    segments = [(s, min(s + 4, frames - 1)) for s in range(0, frames, 5)]
    times = []
    for i in range(repeats + 2):
        tokens = make_tokens(frames, dim, device, segments)
        strategy.start(0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        strategy.tokcomp_pre_llm(tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    plain = time_select(DecoupledSelect(ratio=args.ratio), args.frames, args.dim, args.device, args.repeats)
    offload = time_select(DecoupledSelect(ratio=args.ratio, offload_static=True), args.frames, args.dim,
                          args.device, args.repeats)
    print(f"device={args.device} frames={args.frames} ratio={args.ratio} threads={torch.get_num_threads()}")
    print(f"stage-2 selection, plain:   {plain:8.3f} ms (median of {args.repeats})")
    print(f"stage-2 selection, offload: {offload:8.3f} ms  ratio {plain / offload:.2f}x")


if __name__ == "__main__":
    main()
