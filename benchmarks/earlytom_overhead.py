"""EarlyTom's own cost (scores, segmentation, merges, selection) as a share of its time-to-first-token.

Two parts, both printed side by side in one run:

1. The received-attention score (the mean attention each token receives, which stage 2 ranks by) at
   the shapes of the models, computed the obvious way (float32 softmax probabilities materialised,
   then their column means: what tokcomp did before) and the way ``tokcomp.ops.attention`` does it
   now (one reused buffer per row, exponentiated in place, column sums as a vector-matrix product,
   windows block by block). Interleaved repeats, medians, and the largest relative difference.
2. EarlyTom's full pipeline (stage 1 in the encoder, stage 2 before the LLM, HoliTom's inner merge)
   on the real dimensions with random weights: ``ttft.token_processing_ms`` over ``ttft_ms``.

    python benchmarks/earlytom_overhead.py                                   # both models, 16 frames
    python benchmarks/earlytom_overhead.py --models llava-onevision-0.5b --frames 16 --repeats 3
    python benchmarks/earlytom_overhead.py --scores-only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokcomp.ops.attention import received_attention  # noqa: E402

# The settings of experiments/bench_earlytom.yaml (LLaVA) and experiments/paper_table7.yaml (Qwen).
EARLYTOM = {
    "llava-onevision-0.5b": ([4, 21, 23], 0.5, {}),
    "qwen2.5-vl-3b": ([7, 15, 23], 0.4, {"shots": 1}),
}
# (rows, heads, tokens, head_dim, windows): SigLIP frames of 27x27 patches; Qwen2.5-VL rows of 24x24
# patches (336 px) in its full-attention blocks, and in its 112-px windowed blocks (9 windows of 64).
SHAPES = {
    "llava-onevision-0.5b": [(16, 16, 729, 72, 1)],
    "qwen2.5-vl-3b": [(8, 16, 576, 80, 1), (8, 16, 576, 80, 9)],
}


def materialised_received_attention(q, k, scale, segments=None):
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if segments is not None:
        logits = logits.masked_fill((segments[:, :, None] != segments[:, None, :])[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def score_benchmark(models: list[str], repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    print("received attention          shape (rows, heads, tokens, dim)     materialised    in place   speed-up  max rel diff")
    for model in models:
        for rows, heads, tokens, dim, windows in SHAPES[model]:
            q = torch.randn(rows, heads, tokens, dim, generator=g)
            k = torch.randn(rows, heads, tokens, dim, generator=g)
            segments = None if windows == 1 else (torch.arange(tokens) * windows // tokens).expand(rows, -1)
            args = (q, k, dim ** -0.5, segments)
            old = lambda args=args: materialised_received_attention(*args)  # noqa: E731
            new = lambda args=args: received_attention(*args[:3], segments=args[3])  # noqa: E731
            old(), new()  # warm-up
            a, b = [], []
            for i in range(repeats):
                for fn, into in ((old, a), (new, b))[:: 1 if i % 2 else -1]:
                    into.append(_ms(fn))
            ref, got = old(), new()
            rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
            ta, tb = statistics.median(a), statistics.median(b)
            label = f"{model}{' windowed' if windows > 1 else ''}"
            print(f"{label:27s} {str((rows, heads, tokens, dim)):36s} {ta:9.1f} ms {tb:9.1f} ms {ta / tb:8.2f}x  {rel:.1e}")


def pipeline_benchmark(model: str, frames: int, repeats: int, dtype: str) -> None:
    from tokcomp.pipeline import run
    from tokcomp.plugins import Plugins
    from tokcomp.stack import CompressionStack
    from tokcomp.video import generate_video, uniform_frame_indices

    layers, tau, clip_args = EARLYTOM[model]
    plugins = Plugins()
    spec = SimpleNamespace(weights="random", dtype=dtype, device="cpu", attn_implementation="sdpa", image_size=None,
                           seed=0)
    adapter = plugins.model(model).build(spec)
    clip, _ = generate_video(length=64, height=336, width=336, seed=0, **clip_args)
    video = adapter.preprocess(clip[uniform_frame_indices(64, frames)])
    strategies = [
        plugins.strategy("earlytom.frame_merge").from_params({"layers": layers, "tau_seg": tau, "alpha": 0.9, "M": 6}),
        plugins.strategy("earlytom.decoupled_select").from_params({"ratio": 0.15}),
        plugins.strategy("holitom.inner_merge").from_params({"layer": 18, "merge_ratio": 0.5}),
    ]
    stack = CompressionStack(strategies, adapter.info.for_video(video.grid, video.llm_grid))
    run(adapter, video, "Describe what happens in the video.", stack, max_new_tokens=1)  # warm-up
    passes = [run(adapter, video, "Describe what happens in the video.", stack, max_new_tokens=1).timings_ms
              for _ in range(repeats)]
    ttft = statistics.median(p["ttft_ms"] for p in passes)
    own = statistics.median(p["token_processing_ms"] for p in passes)
    shares = ", ".join(f"{100 * p['token_processing_ms'] / p['ttft_ms']:.2f}%" for p in passes)
    print(f"{model} ({dtype}, {frames} frames, EarlyTom 15%, {repeats} passes): token processing median "
          f"{own:.0f} ms of TTFT {ttft:.0f} ms = {100 * own / ttft:.2f}% (each pass: {shares}; target <= 3%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EARLYTOM), choices=list(EARLYTOM))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="float32 on CPUs without fast bfloat16 kernels")
    parser.add_argument("--scores-only", action="store_true", help="only the received-attention comparison")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"vector unit {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    score_benchmark(args.models, max(args.repeats, 5))
    if not args.scores_only:
        for model in args.models:
            pipeline_benchmark(model, args.frames, args.repeats, args.dtype)


if __name__ == "__main__":
    main()
