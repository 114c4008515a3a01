"""A sweep locally and through Ray, side by side: wall time, and Ray's overhead per configuration.

The same 8-point sweep of the tiny model (quickstart.yaml: 4 pooling ratios x 2 frame counts, 5
configurations a point, 40 runs) runs three ways in one process, in interleaved rounds, each logging to the same real
``mlflow server`` (sqlite backend) started here: locally; through Ray with 1 worker holding the same
CPUs as the local run (so the difference is Ray's cost, not parallelism); through Ray with 2 workers
of 1 CPU. Start-up (``ray.init``, starting the workers) is timed apart and excluded from the overhead:

    overhead per configuration = (Ray 1 worker - its worker start - local) / configurations

Then, on paper, the wall time of the EarlyTom paper's Table 1 grid (24 configurations of
LLaVA-OneVision-7B on MVBench, EgoSchema, LongVideoBench and VideoMME) against the number of GPUs,
from the paper's own measured TTFT and throughput per configuration (A100), this overhead, and the
stated assumptions (answer length, video loading, model load).

    python benchmarks/ray_sweep.py [--repeats 3] [--video-load-s 0.5] [--model-load-s 60]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = ["configurations.pooling_25.strategies.0.params.ratio=0.1,0.25,0.5,0.75", "input.frames=8,16"]

# EarlyTom paper, Table 1 (LLaVA-OneVision-7B, 32 frames, one A100): TTFT ms and decode tokens/s per row
TABLE_1 = [(889.9, 24.4), (820.0, 28.4), (813.4, 28.3), (905.6, 21.1), (516.6, 29.4), (703.6, 29.4), (581.6, 26.9),
           (661.3, 29.9), (426.3, 32.9), (495.0, 29.8), (662.1, 29.5), (546.6, 27.6), (622.3, 30.0), (415.3, 33.4),
           (475.9, 32.1), (574.1, 27.1), (530.8, 28.7), (572.7, 27.5), (390.6, 30.4), (458.5, 28.5), (592.2, 28.6),
           (502.1, 28.3), (556.6, 29.0), (336.2, 31.6)]
# samples of the lmms-eval tasks: mvbench, egoschema_subset, longvideobench_val_v, videomme
BENCHMARK_SAMPLES = {"MVBench": 4000, "EgoSchema (subset)": 500, "LongVideoBench (val)": 1337, "VideoMME": 2700}


def start_server(folder: Path) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    started = time.perf_counter()
    process = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return process, uri, time.perf_counter() - started
        except OSError:
            if process.poll() is not None:
                sys.exit("mlflow server did not start")
            time.sleep(0.5)


def timed_sweep(uri: str, name: str, executor: str, extra: list[str]) -> tuple[float, int]:
    from tokcomp.sweep import SweepRunner

    overrides = [f"tracking.uri={uri}", f"tracking.experiment={name}", *extra, *GRID]
    sweep = SweepRunner(str(ROOT / "experiments" / "quickstart.yaml"), overrides, executor=executor)
    started = time.perf_counter()
    result = sweep.run(log=lambda _: None, progress=False)
    seconds = time.perf_counter() - started
    if result.failed:
        sys.exit(f"{name}: failed: {result.failed}")
    return seconds, len(result.configurations)


def worker_start(num_cpus: float, count: int) -> float:
    """Seconds to start ``count`` workers (actors, torch imported) and see them answer."""
    from tokcomp.distributed import WorkerPool

    started = time.perf_counter()
    pool = WorkerPool({"CPU": num_cpus, "GPU": 0.0}, count, count, count, log=lambda _: None)
    seconds = time.perf_counter() - started
    pool.close()
    return seconds


def paper_grid(overhead_s: float, video_load_s: float, model_load_s: float, answer_tokens: int) -> None:
    samples = sum(BENCHMARK_SAMPLES.values())
    per_config = [samples * (ttft / 1000 + (answer_tokens - 1) / rate + video_load_s) for ttft, rate in TABLE_1]
    total = sum(per_config)
    print(f"\nOn paper: the EarlyTom paper's Table 1 grid: {len(TABLE_1)} configurations x {samples} samples "
          f"({', '.join(f'{k} {v}' for k, v in BENCHMARK_SAMPLES.items())})")
    print(f"per sample: the row's measured A100 TTFT + {answer_tokens - 1} decode step(s) at its tokens/s + "
          f"{video_load_s:g} s video loading; {model_load_s:g} s to load the 7B model once per GPU worker; "
          f"Ray overhead {overhead_s * 1000:.0f} ms per task (measured above), shards of 50 samples")
    print(f"one GPU, in sequence: {total / 3600:.1f} h of model time")
    tasks = len(TABLE_1) * sum(math.ceil(n / 50) for n in BENCHMARK_SAMPLES.values())
    print(f"{'GPUs':>5} {'wall h':>8} {'speed-up':>9} {'efficiency':>10}")
    one = None
    for gpus in (1, 2, 4, 8, 16, 32, 64, 128):
        wall = model_load_s + (total + tasks * overhead_s) / gpus
        one = one or wall
        print(f"{gpus:>5} {wall / 3600:>8.2f} {one / wall:>9.2f} {one / wall / gpus:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-load-s", type=float, default=0.5,
                        help="seconds to decode and sample one benchmark video (not in the paper's TTFT)")
    parser.add_argument("--model-load-s", type=float, default=60.0, help="seconds to load the 7B model on a GPU")
    parser.add_argument("--answer-tokens", type=int, default=2, help="tokens generated per answer (letter, end)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three sweeps")
    args = parser.parse_args()
    import ray
    import torch

    from tokcomp.tracking import _cpu_name

    print(f"machine: {platform.platform()}, {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        process, uri, server_s = start_server(Path(tmp))
        try:
            print(f"mlflow server started in {server_s:.1f} s at {uri}")
            started = time.perf_counter()
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            init_s = time.perf_counter() - started
            threads = float(torch.get_num_threads())
            times: dict[str, list[float]] = {"local": [], "ray1": [], "start1": [], "ray2": [], "start2": []}
            for r in range(args.repeats):  # interleaved, so drift on a shared machine hits each alike
                local_s, runs = timed_sweep(uri, f"bench-local-{r}", "local", [])
                times["local"].append(local_s)
                times["start1"].append(worker_start(threads, 1))
                times["ray1"].append(timed_sweep(uri, f"bench-ray1-{r}", "ray",
                                                 [f"ray.num_cpus={threads:g}", "ray.workers=1"])[0])
                times["start2"].append(worker_start(1.0, 2))
                times["ray2"].append(timed_sweep(uri, f"bench-ray2-{r}", "ray", ["ray.num_cpus=1", "ray.workers=2"])[0])
            ray.shutdown()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in times.items()}
    overheads = [(ray1 - start - local) / runs for ray1, start, local in
                 zip(times["ray1"], times["start1"], times["local"], strict=True)]
    overhead = statistics.median(overheads)
    print(f"\n8-point sweep of the tiny model, {runs} configuration runs, all logging to one mlflow server; "
          f"median of {args.repeats} interleaved rounds (min-max)")
    print(f"{'executor':<34} {'wall s':>8} {'(min-max)':>11} {'start-up s':>10} {'s/config':>9} {'vs local':>9}")
    print(f"{f'local (1 process, {threads:g} threads)':<34} {med['local']:>8.1f} {spread['local']:>11} {'-':>10} "
          f"{med['local'] / runs:>9.3f} {'x1.00':>9}")
    for label, key, start in ((f"ray, 1 worker of {threads:g} CPUs", "ray1", "start1"),
                              ("ray, 2 workers of 1 CPU", "ray2", "start2")):
        work = med[key] - med[start]
        print(f"{label:<34} {med[key]:>8.1f} {spread[key]:>11} {med[start]:>10.1f} {work / runs:>9.3f} "
              f"{'x' + format(med['local'] / work, '.2f'):>9}")
    print(f"ray.init: {init_s:.1f} s (excluded above); Ray overhead per configuration (1 worker against local, "
          f"start-up excluded): {overhead * 1000:.0f} ms median ({min(overheads) * 1000:.0f} to "
          f"{max(overheads) * 1000:.0f} ms over the rounds)")
    paper_grid(max(overhead, 0.0), args.video_load_s, args.model_load_s, args.answer_tokens)


if __name__ == "__main__":
    main()
