"""tokcomp's own overhead: the uncompressed pipeline against the stock transformers forward.

Both compute the first token of the same prompt on the same model and video: the stock side is
``model(**adapter.stock_inputs(...))`` (transformers' own vision tower, splice and prefill), the
tokcomp side is ``tokcomp.pipeline.run`` with no strategy and one new token (its own vision loop,
splice, ledger, stage clock and prefill). Passes alternate in one process and the medians are
compared, so load on a shared machine hits both alike.

    python benchmarks/overhead.py [--model llava-onevision-0.5b] [--frames 4] [--dtype bfloat16]
                                  [--repeats 7] [--height 336 --width 336]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from types import SimpleNamespace

import torch

from tokcomp.pipeline import run
from tokcomp.plugins import Plugins
from tokcomp.stack import CompressionStack
from tokcomp.video import generate_video, uniform_frame_indices

PROMPT = "Describe what happens in the video."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-onevision-0.5b")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--height", type=int, default=336)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--image-size", type=int, default=None, help="LLaVA random weights: a smaller image")
    args = parser.parse_args()

    spec = SimpleNamespace(weights="random", dtype=args.dtype, device=args.device, attn_implementation="sdpa",
                           image_size=args.image_size, seed=0)
    adapter = Plugins().model(args.model).build(spec)
    clip, _ = generate_video(length=64, height=args.height, width=args.width, seed=0)
    video = adapter.preprocess(clip[uniform_frame_indices(64, args.frames)])
    stack = CompressionStack([], adapter.info.for_video(video.grid, video.llm_grid))
    stock_inputs = adapter.stock_inputs(PROMPT, video)

    def tokcomp_pass() -> tuple[float, int]:
        start = time.perf_counter()
        out = run(adapter, video, PROMPT, stack, max_new_tokens=1)
        _sync(adapter.device)
        return (time.perf_counter() - start) * 1e3, out.new_ids[0]

    def stock_pass() -> tuple[float, int]:
        start = time.perf_counter()
        with torch.no_grad():
            logits = adapter.model(**stock_inputs, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        _sync(adapter.device)
        return (time.perf_counter() - start) * 1e3, token

    tokcomp_pass(), stock_pass()  # warm-up
    ours, theirs = [], []
    for i in range(args.repeats):
        for fn, into in ((tokcomp_pass, ours), (stock_pass, theirs))[:: 1 if i % 2 else -1]:
            into.append(fn())
    tokens = {t for _, t in ours} | {t for _, t in theirs}
    a, b = statistics.median(m for m, _ in ours), statistics.median(m for m, _ in theirs)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"model {args.model} ({args.dtype}), {args.frames} frames at {args.height}x{args.width}, "
          f"{stack.info.pooled_grid} LLM grid per row, {args.repeats} interleaved passes each")
    print(f"first token: {'identical' if len(tokens) == 1 else 'DIFFERENT: ' + str(sorted(tokens))}")
    print(f"stock transformers forward  median {b:9.1f} ms  (min {min(m for m, _ in theirs):.1f})")
    print(f"tokcomp pipeline            median {a:9.1f} ms  (min {min(m for m, _ in ours):.1f})")
    print(f"overhead: {100 * (a - b) / b:+.2f}% of TTFT")


if __name__ == "__main__":
    main()
