"""The one prepared GPU check: Triton kernels and the tiny-model suite on CUDA, then the paper's TTFT ratios.

    bash benchmarks/gpu_check.sh OUT                                   # on the GPU machine (installs, then this)
    python benchmarks/gpu_check.py --out OUT                           # the same, tokcomp already installed
    python benchmarks/gpu_check.py --device cpu --dry-run --out OUT    # every code path, small, on a CPU

Sections, in order; each is isolated (one that fails is recorded with its error and the rest run) and the
results are rewritten after each, so a run cut short keeps what it measured:

  env            the GPU, versions, the SDPA backends torch can use, flash-attn
  kernels        tests/test_kernels.py on the device: every kernel against its torch reference, compiled
  suite          the tiny-model suite (SUITE_FILES) with TOKCOMP_TEST_DEVICE=cuda: every strategy on every
                 tiny model, exactness against stock transformers, hook points, attention statistics,
                 each method's tests, the Qwen adapters; under sdpa, then EAGER_FILES under eager attention
  kernel_timing  benchmarks/kernel_timing.py's cases: each kernel vs its torch reference, CUDA events
  attention      the 0.5B dimensions under sdpa's flash / efficient / math backends and eager attention:
                 the same retained tokens and the same first token for the attention-based methods
  ttft           LLaVA-OneVision-7B and -0.5B (random weights, bf16, sdpa, 32 frames): uncompressed,
                 EarlyTom / VisionZip / HoliTom / FastV at 10% and 25% (experiments/paper_table1.yaml's
                 settings), EarlyTom 10% with the offloaded static selection; the Figure-3 breakdown from
                 CUDA events (warm-up, then repeats interleaved across configurations, medians), speedups,
                 the exact-FLOPs ratio each speedup is measured against, peak memory
  frames64       the 7B with 64 frames: uncompressed and EarlyTom 10% / 25%
  offload        EarlyTom's stage-2 selection alone, plain vs offloaded static frames, at both LLM widths

OUT gets gpu_check.json (every number), gpu_check.md (the tables and the targets) and the pytest logs.
The dry run replaces the models by the 0.5B dimensions at 112 px and 4 frames (8 for frames64), and the
suite by a few tests, so that CI checks every path of this script in about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # kernel_timing, offload: siblings of this file

# The paper's reported TTFT speedups of EarlyTom at 10% (A100, 32 frames; Table 1 / Figure 1).
PAPER_SPEEDUP = {"llava-onevision-7b": 2.65, "llava-onevision-0.5b": 1.48}
TARGET_SPEEDUP_7B = 2.65
TARGET_FLOPS_EFFICIENCY = 0.85  # measured speedup over the speedup its exact-FLOPs ratio allows
TARGET_OWN_SHARE = 0.03  # EarlyTom's token processing over its TTFT
# The tests that build tiny models through tests/conftest.model_spec and hold no CPU-only assumption (checked
# here with a checker that marks model tensors as CUDA): conformance of every strategy on every family,
# exactness against stock transformers, hook points, attention statistics, each method, the adapters.
SUITE_FILES = [f"tests/test_{name}.py" for name in (
    "every_strategy", "exactness", "hook_points", "attention_stats", "strategies", "inner_merge", "riders", "earlytom",
    "holitom", "visionzip", "fastvid", "prunevid", "dycoke", "tome", "qwen2_5_vl_adapter", "qwen3_vl_adapter",
    "qwen_intra_encoder")]
EAGER_FILES = SUITE_FILES[:6]  # the second pass, under eager attention: where attention is read or compared
PROMPT = "Describe what happens in the video."
# Parameters of Table 1's settings that do not fit a preset's depth: the dry run's tiny model has 4 vision
# and 4 decoder layers (the same overrides as tests/test_every_strategy.py's).
PARAM_OVERRIDES = {
    "tiny": {"earlytom.frame_merge": {"layers": [1, 2]}, "earlytom.decoupled_select": {"score_layer": -1},
             "holitom.inner_merge": {"layer": 2}},
}


# ------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    device: str
    dry_run: bool
    out: Path
    budget_s: float
    models: list[tuple[str, int, int | None]]  # (preset, frames, image_size or None)
    frames64: tuple[str, int, int | None] | None
    attention_model: tuple[str, int, int | None]
    warmup: int
    repeats: int
    kernel_repeats: int
    suite_args: list[str]  # extra pytest arguments of the suite section (the dry run's selection)
    kernel_args: list[str]  # extra pytest arguments of the kernels section
    suite_timeout_s: float
    dtype: str
    started: float = field(default_factory=time.monotonic)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def parse_model(text: str) -> tuple[str, int, int | None]:
    """PRESET:FRAMES[:IMAGE_SIZE] -> (preset, frames, image_size)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRESET:FRAMES[:IMAGE_SIZE], got {text!r}") from None


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {device} but torch sees no CUDA GPU here; use --device cpu --dry-run")
    if device == "cpu" and not args.dry_run:
        raise SystemExit("gpu_check: the full check on --device cpu would take hours; add --dry-run")
    if args.dry_run:  # every path of the script in about a minute on 2 CPU cores
        models = args.models or [("tiny", 8, None)]
        return Settings(device, True, args.out, args.budget_s, models, args.frames64 or (models[0][0], 16, models[0][2]),
                        args.attention_model or models[0], warmup=1, repeats=1, kernel_repeats=1,
                        suite_args=["-k", "tiny_pipeline_reproduces_stock"],
                        kernel_args=["-k", "hand_computed or dispatcher"], suite_timeout_s=240,
                        dtype="float32" if device == "cpu" else "bfloat16")
    return Settings(device, False, args.out, args.budget_s,
                    args.models or [("llava-onevision-7b", 32, None), ("llava-onevision-0.5b", 32, None)],
                    args.frames64 or ("llava-onevision-7b", 64, None), args.attention_model or ("llava-onevision-0.5b", 8, None),
                    warmup=args.warmup, repeats=args.repeats, kernel_repeats=100, suite_args=[], kernel_args=[],
                    suite_timeout_s=200, dtype="bfloat16")


def configurations(preset: str, experiment: Path = ROOT / "experiments" / "paper_table1.yaml") -> dict[str, list[dict]]:
    """Name -> strategy list: the uncompressed model, and Table 1's EarlyTom / VisionZip / HoliTom settings at
    10% and 25% read from the experiment file (one source for both), FastV (K=2) at the same ratios, and
    EarlyTom 10% with stage 2's static-frame selection offloaded; PARAM_OVERRIDES[preset] applied."""
    table = yaml.safe_load(experiment.read_text())["configurations"]
    configs: dict[str, list[dict]] = {"uncompressed": []}
    for ratio in (10, 25):
        for method in ("earlytom", "visionzip", "holitom"):
            configs[f"{method}_{ratio}"] = table[f"{method}_{ratio}"]["strategies"]
        configs[f"fastv_{ratio}"] = [{"name": "fastv", "params": {"layer": 2, "ratio": ratio / 100}}]
    configs["earlytom_10_offload"] = [
        {**s, "params": {**s["params"], "offload_static": True}} if s["name"] == "earlytom.decoupled_select" else s
        for s in configs["earlytom_10"]
    ]
    overrides = PARAM_OVERRIDES.get(preset, {})
    return {name: [{"name": s["name"], "params": {**s.get("params", {}), **overrides.get(s["name"], {})}} for s in strategies]
            for name, strategies in configs.items()}


# ------------------------------------------------------------------------------------------- results


class Results:
    """Sections' results, rewritten to OUT/gpu_check.json and .md after each section."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"sections": {}}
        self.markdown: dict[str, str] = {}

    def section(self, name: str, settings: Settings, fn, *, needs_s: float = 0.0) -> None:
        left = settings.left_s()
        if left < needs_s:
            self.data["sections"][name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left, needs ~{needs_s:.0f}"}
            print(f"\n== {name}: skipped ({left:.0f} s left of the budget, needs ~{needs_s:.0f})", flush=True)
            self.write()
            return
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            result, text = fn(settings)
            entry = {"status": "ok", **result}
        except Exception as exc:  # recorded, and the other sections still run
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            text = f"**error**: `{type(exc).__name__}: {str(exc)[:500]}`"
            print(traceback.format_exc(), flush=True)
        entry["seconds"] = round(time.monotonic() - start, 1)
        self.data["sections"][name] = entry
        self.markdown[name] = text
        print(text, flush=True)
        self.write()

    def write(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")
        parts = [f"# tokcomp GPU check\n\n{self.data.get('header', '')}\n"]
        for name, entry in self.data["sections"].items():
            status = entry["status"]
            extra = f" ({entry['seconds']} s)" if "seconds" in entry else f": {entry.get('reason', '')}"
            parts.append(f"## {name}: {status}{extra}\n\n{self.markdown.get(name, '')}\n")
        (self.out / "gpu_check.md").write_text("\n".join(parts))


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sections


def env_section(s: Settings):
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": s.device,
            "dry_run": s.dry_run, "host_cpus": os.cpu_count(), "platform": platform.platform()}
    for module in ("transformers", "triton", "numpy", "pluggy"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:
            info[module] = f"missing ({type(exc).__name__})"
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except Exception:
        info["flash_attn"] = "not installed"
    if s.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdpa_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    sdpa_cudnn=torch.backends.cuda.cudnn_sdp_enabled())
    from tokcomp.ops import kernels

    info["triton_driver"] = kernels.triton_available()
    return info, md_table(["what", "value"], [[k, v] for k, v in info.items()])


def _pytest(s: Settings, files: list[str], env: dict[str, str], log_name: str, timeout_s: float,
            extra: list[str] = ()) -> dict:
    """pytest in a subprocess; counts from its JUnit XML, its output to OUT/log_name."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        workers = [] if s.dry_run else ["-n", "8"]  # the GPU machine has 16 cores; tiny models share the GPU
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *workers,
                   f"--junitxml={xml}", *files, *extra]
        start = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                                  timeout=timeout_s)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            output, rc = output + f"\n[gpu_check: stopped after {timeout_s:.0f} s]", "timeout"
        (s.out / log_name).write_text(output)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if xml.exists():
            for suite in ET.parse(xml).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
        failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"rc": rc, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed[:40], "log": log_name, "seconds": round(time.monotonic() - start, 1)}


def kernels_section(s: Settings):
    env = {"TOKCOMP_TEST_DEVICE": s.device}
    result = _pytest(s, ["tests/test_kernels.py"], env, "kernels.log", 300, s.kernel_args)
    if result["rc"] != 0:
        raise RuntimeError(f"kernel tests rc={result['rc']}: {result['failed'] or 'see kernels.log'}")
    return result, f"{result['passed']} passed, {result['skipped']} skipped (tests/test_kernels.py on {s.device})"


def suite_section(s: Settings):
    runs, rows = {}, []
    for attn in ("sdpa", "eager"):
        budget = min(s.suite_timeout_s, max(30.0, s.left_s() - 5))
        files = SUITE_FILES if attn == "sdpa" else EAGER_FILES
        r = _pytest(s, files, {"TOKCOMP_TEST_DEVICE": s.device, "TOKCOMP_TEST_ATTN": attn}, f"suite_{attn}.log",
                    budget, s.suite_args)
        runs[attn] = r
        rows.append([attn, r["passed"], r["failures"] + r["errors"], r["skipped"], r["rc"], r["seconds"]])
    text = md_table(["attention", "passed", "failed", "skipped", "rc", "s"], rows)
    for attn, r in runs.items():
        if r["failed"]:
            text += f"\n\n{attn} failures:\n" + "\n".join(f"- `{line[:300]}`" for line in r["failed"])
    return {"runs": runs}, text


def kernel_timing_section(s: Settings):
    """The fixed cases of benchmarks/kernel_timing.py, then every distinct call the ttft runs made."""
    import kernel_timing

    at_calls = kernel_timing.measure_calls(RECORDED_CALLS, 3 if s.dry_run else 10, s.kernel_repeats, s.device)
    calls_text = (f"\n\nat the sizes the ttft runs used ({len(RECORDED_CALLS)} calls recorded in their warm-up, "
                  f"distinct ones below):\n\n```\n{kernel_timing.calls_table(at_calls)}\n```")
    if s.device.startswith("cuda"):
        result = kernel_timing.measure_cuda(10, s.kernel_repeats)
        slower = [r["case"] for r in result["cases"] if r["speedup"] < 1.0]
        slower_used = [f"{r['op']} {r['shapes']} {r['dtypes'][0]}" for r in at_calls if r.get("speedup", 1.0) < 1.0]
        result.update(slower_than_torch=slower, at_calls=at_calls, slower_at_used_sizes=slower_used)
        text = (f"{result['device']}, copy {result['copy_GBps']:.0f} GB/s, median of {s.kernel_repeats} after 10 "
                f"warm-up, L2 flushed\n\n```\n{kernel_timing.cuda_table(result)}\n```\n\nkernels slower than torch: "
                f"{slower or 'none'}" + calls_text + f"\n\nslower than torch at a used size: {slower_used or 'none'}")
        return result, text
    result = kernel_timing.measure_cpu(0, s.kernel_repeats)
    result["at_calls"] = at_calls
    return result, f"(CPU: the torch references only)\n\n```\n{kernel_timing.cpu_table(result)}\n```" + calls_text


_BUILT: dict[tuple, tuple[object, float]] = {}  # one build per (preset, image size, attention, dtype, device)
RECORDED_CALLS: list = []  # kernel calls of the ttft section's warm-up runs: the sizes kernel_timing times


class Bench:
    """One built model (built once per process: the 7B serves both the ttft and frames64 sections) and one
    video; runs a configuration once and returns its output and peak memory."""

    def __init__(self, s: Settings, preset: str, frames: int, image_size: int | None, attn: str = "sdpa"):
        from tokcomp.plugins import Plugins
        from tokcomp.video import generate_video, uniform_frame_indices

        self.plugins, self.device = Plugins(), s.device
        key = (preset, image_size, attn, s.dtype, s.device)
        if key not in _BUILT:
            spec = SimpleNamespace(weights="random", dtype=s.dtype, device=s.device, attn_implementation=attn,
                                   image_size=image_size, seed=0)
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            adapter = self.plugins.model(preset).build(spec)
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
            _BUILT[key] = (adapter, time.perf_counter() - start)
        self.adapter, self.build_s = _BUILT[key]
        size = image_size or 384
        length = 2 * frames
        clip, _ = generate_video(length=length, height=size, width=size, shots=3, seed=0)
        self.video = self.adapter.preprocess(clip[uniform_frame_indices(length, frames)])
        self.weights_MiB = sum(p.numel() * p.element_size() for p in self.adapter.model.parameters()) / 2**20

    def run(self, strategies: list[dict], probe=None):
        """One run (``probe``: a strategy appended last, e.g. a KeptSources)."""
        from tokcomp.pipeline import run
        from tokcomp.stack import CompressionStack
        from tokcomp.timing import PeakMemory

        built = [self.plugins.strategy(x["name"]).from_params(dict(x.get("params", {}))) for x in strategies]
        built += [probe] if probe is not None else []
        stack = CompressionStack(built, self.adapter.info.for_video(self.video.grid, self.video.llm_grid))
        try:
            with PeakMemory(self.device) as peak:
                out = run(self.adapter, self.video, PROMPT, stack, max_new_tokens=1, min_new_tokens=1)
        finally:
            stack.close()
        return out, peak.peak_mb


def measure(bench: Bench, configs: dict[str, list[dict]], warmup: int, repeats: int) -> dict[str, dict]:
    """Warm-up runs (their kernel calls recorded), then ``repeats`` rounds over all configurations (order
    rotated each round so that no configuration always follows the same one); medians of each timing."""
    from tokcomp.flops import count_all
    from tokcomp.ops import kernels

    names = list(configs)
    with kernels.record_calls() as calls:
        for name in names:
            for _ in range(warmup):
                bench.run(configs[name])
    RECORDED_CALLS.extend(calls)
    samples: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(bench.run(configs[name]))
    table = {}
    for name, runs in samples.items():
        out = runs[-1][0]
        flops = count_all(out.ledger, bench.adapter.dims)
        keys = runs[0][0].timings_ms.keys()
        timings = {k: statistics.median(o.timings_ms[k] for o, _ in runs) for k in keys}
        ledger = out.ledger
        table[name] = {
            **timings,
            "ttft_runs_ms": [round(o.timings_ms["ttft_ms"], 2) for o, _ in runs],
            "peak_MiB": max(p for _, p in runs),
            "retained": ledger.retained_ratio, "llm_visual_tokens": ledger.visual_tokens_after_pre_llm,
            "exact_T": flops["exact"].total_T, "paper_T": flops["paper"].total_T,
            "first_token": out.new_ids[0] if out.new_ids else None,
        }
    base = table["uncompressed"]
    for row in table.values():
        row["speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["flops_speedup"] = base["exact_T"] / row["exact_T"]
        row["flops_efficiency"] = row["speedup"] / row["flops_speedup"]
        row["own_share"] = row["token_processing_ms"] / row["ttft_ms"]
    return table


def ttft_markdown(title: str, table: dict[str, dict]) -> str:
    headers = ["configuration", "retained", "TTFT ms", "vision", "token proc.", "prefill", "other", "speedup",
               "exact TFLOPs", "FLOPs speedup", "of FLOPs bound", "own share", "peak MiB"]
    rows = [[name, f"{r['retained']:.1%}", f"{r['ttft_ms']:.1f}", f"{r['vision_ms']:.1f}", f"{r['token_processing_ms']:.1f}",
             f"{r['prefill_ms']:.1f}", f"{r['other_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['exact_T']:.3g}",
             f"{r['flops_speedup']:.2f}x", f"{r['flops_efficiency']:.0%}", f"{r['own_share']:.1%}", f"{r['peak_MiB']:.0f}"]
            for name, r in table.items()]
    return f"### {title}\n\n" + md_table(headers, rows)


def targets(preset: str, table: dict[str, dict], dry_run: bool) -> tuple[dict, str]:
    e = table["earlytom_10"]
    paper = PAPER_SPEEDUP.get(preset)
    checks = {
        "earlytom_10_speedup": e["speedup"], "paper_speedup": paper,
        "flops_efficiency": e["flops_efficiency"], "own_share": e["own_share"],
        "efficiency_met": e["flops_efficiency"] >= TARGET_FLOPS_EFFICIENCY, "own_share_met": e["own_share"] <= TARGET_OWN_SHARE,
    }
    if preset == "llava-onevision-7b":
        checks["speedup_met"] = e["speedup"] >= TARGET_SPEEDUP_7B
    offload = table.get("earlytom_10_offload")
    if offload:
        checks["offload_gain"] = e["ttft_ms"] / offload["ttft_ms"]
    lines = [f"EarlyTom 10%: {e['speedup']:.2f}x TTFT over uncompressed"
             + (f" (paper {paper}x on an A100)" if paper else "")
             + f"; {e['flops_efficiency']:.0%} of the {e['flops_speedup']:.2f}x its exact FLOPs allow "
             f"(target >= {TARGET_FLOPS_EFFICIENCY:.0%}); its own token processing {e['own_share']:.1%} of its TTFT "
             f"(target <= {TARGET_OWN_SHARE:.0%})"]
    if "speedup_met" in checks:
        lines.append(f"target >= {TARGET_SPEEDUP_7B}x: {'met' if checks['speedup_met'] else 'NOT met'}")
    if offload:
        lines.append(f"offloaded static selection: TTFT {offload['ttft_ms']:.1f} ms vs {e['ttft_ms']:.1f} ms "
                     f"({checks['offload_gain']:.2f}x)")
    if dry_run:
        lines.append("(dry run: small settings, the numbers say nothing about the targets)")
    return checks, "\n\n" + "; ".join(lines)


def ttft_section(s: Settings):
    result, text = {}, []
    for preset, frames, image_size in s.models:
        bench = Bench(s, preset, frames, image_size)
        table = measure(bench, configurations(preset), s.warmup, s.repeats)
        checks, summary = targets(preset, table, s.dry_run)
        key = f"{preset}@{frames}"
        result[key] = {"build_s": bench.build_s, "weights_MiB": bench.weights_MiB, "configurations": table, "targets": checks}
        text.append(ttft_markdown(f"{preset}, {frames} frames, {s.dtype}, sdpa (build {bench.build_s:.1f} s, "
                                  f"weights {bench.weights_MiB:.0f} MiB)", table) + summary)
        del bench
    return result, "\n\n".join(text)


def frames64_section(s: Settings):
    preset, frames, image_size = s.frames64
    all_configs = configurations(preset)
    configs = {n: all_configs[n] for n in ("uncompressed", "earlytom_10", "earlytom_25")}
    bench = Bench(s, preset, frames, image_size)
    table = measure(bench, configs, s.warmup, max(1, s.repeats // 2))
    result = {"preset": preset, "frames": frames, "weights_MiB": bench.weights_MiB, "configurations": table}
    del bench
    _free(s, preset)
    return result, ttft_markdown(f"{preset}, {frames} frames", table)


def attention_section(s: Settings):
    """Attention-based methods keep the same tokens whichever kernel computes attention."""
    preset, frames, image_size = s.attention_model
    all_configs = configurations(preset)
    names = ["uncompressed", "fastv_25", "visionzip_25", "earlytom_25", "holitom_25"]
    from torch.nn.attention import SDPBackend

    forced = [SDPBackend.MATH]  # the CPU has no flash / efficient kernels to force
    if s.device.startswith("cuda"):
        forced = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    backends: list[tuple[str, object]] = [("sdpa (default)", None)] + [(f"sdpa {b.name.lower()}", b) for b in forced]
    outcomes: dict[str, dict] = {}
    bench = Bench(s, preset, frames, image_size, "sdpa")
    for label, backend in backends:
        ctx = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel(backend)
        outcomes[label] = _outcomes(bench, all_configs, names, ctx)
    del bench
    eager = Bench(s, preset, frames, image_size, "eager")
    outcomes["eager"] = _outcomes(eager, all_configs, names, contextlib.nullcontext())
    del eager
    _free(s, *{key[0] for key in _BUILT})  # nothing after this section builds a model in this process
    ref = outcomes["sdpa (default)"]
    rows, agree = [], True
    for label, per in outcomes.items():
        for name in names:
            o, r = per[name], ref[name]
            if "error" in o:
                rows.append([label, name, "error", o["error"][:120], "", ""])
                agree = False
                continue
            same = o["sources"] == r.get("sources") and o["llm_layers"] == r.get("llm_layers")
            agree &= same
            diff = float((o["logits"] - r["logits"]).abs().max() / r["logits"].abs().max().clamp_min(1e-30))
            rows.append([label, name, o["llm_tokens"], "same" if same else "DIFFERENT",
                         "same" if o["first_token"] == r["first_token"] else "differs", f"{diff:.1e}"])
    serial = {k: {n: {x: y for x, y in v.items() if x not in ("logits", "sources")} for n, v in per.items()}
              for k, per in outcomes.items()}
    text = md_table(["attention", "configuration", "LLM visual tokens", "kept tokens and LLM lengths vs default",
                     "first token", "max rel logit diff"], rows)
    return {"agree": agree, "outcomes": serial}, text + f"\n\nevery backend keeps the same tokens: {agree}"


def kept_sources_probe():
    """A strategy that records which original tokens reach the LLM: which tokens a method keeps, not only how
    many, is what must not depend on the attention kernel."""
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class KeptSources(Strategy):
        name = "gpu_check.kept_sources"
        sources: list = field(default_factory=list)

        @hookimpl
        def tokcomp_pre_llm(self, state) -> None:
            self.sources = sorted(state.source.flatten().tolist())

    return KeptSources()


def _outcomes(bench: Bench, configs: dict, names: list[str], ctx) -> dict[str, dict]:
    result = {}
    with ctx:
        for name in names:
            try:
                probe = kept_sources_probe()
                out, _ = bench.run(configs[name], probe)
                result[name] = {"llm_tokens": out.ledger.visual_tokens_after_pre_llm, "retained": out.ledger.retained_ratio,
                                "llm_layers": out.ledger.llm_layers, "first_token": out.new_ids[0], "logits": out.prefill_logits,
                                "sources": probe.sources}
            except Exception as exc:
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def offload_section(s: Settings):
    from offload import time_select
    from tokcomp.strategies.earlytom import DecoupledSelect

    rows, result = [], {}
    repeats = 3 if s.dry_run else 20
    for model, dim in (("llava-onevision-0.5b", 896), ("llava-onevision-7b", 3584)):
        for frames in (32, 64):
            plain = time_select(DecoupledSelect(ratio=0.1), frames, dim, s.device, repeats)
            off = time_select(DecoupledSelect(ratio=0.1, offload_static=True), frames, dim, s.device, repeats)
            result[f"{model}@{frames}"] = {"plain_ms": plain, "offload_ms": off, "gain": plain / off}
            rows.append([model, dim, frames, f"{plain:.2f}", f"{off:.2f}", f"{plain / off:.2f}x"])
    return result, md_table(["model", "LLM width", "frames", "plain ms", "offloaded ms", "plain/offloaded"], rows)


def _free(s: Settings, *presets: str) -> None:
    """Drops the cached builds of ``presets`` and returns the memory to the device."""
    import gc

    for key in [k for k in _BUILT if k[0] in presets]:
        del _BUILT[key]
    gc.collect()
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and logs")
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu (with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="small settings: checks the script's paths, not the targets")
    parser.add_argument("--budget-s", type=float, default=470.0, help="sections that would not fit are skipped")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", type=parse_model, default=None, metavar="PRESET:FRAMES[:SIZE]",
                        help="ttft section's models (default llava-onevision-7b:32 llava-onevision-0.5b:32)")
    parser.add_argument("--frames64", type=parse_model, default=None, metavar="PRESET:FRAMES[:SIZE]",
                        help="the long-video run (default llava-onevision-7b:64)")
    parser.add_argument("--attention-model", type=parse_model, default=None, metavar="PRESET:FRAMES[:SIZE]",
                        help="the attention-backend comparison (default llava-onevision-0.5b:8)")
    parser.add_argument("--only", nargs="+", default=None,
                        choices=["env", "kernels", "suite", "kernel_timing", "attention", "ttft", "frames64", "offload"])
    args = parser.parse_args(argv)
    s = settings_from(args)
    results = Results(s.out)
    results.data["header"] = (f"device {s.device}{' (dry run)' if s.dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                              f"budget {s.budget_s:.0f} s")
    plan = [  # (name, function, seconds it needs at least to be worth starting)
        ("env", env_section, 0),
        ("kernels", kernels_section, 20),
        ("ttft", ttft_section, 60),
        ("kernel_timing", kernel_timing_section, 15),
        ("frames64", frames64_section, 40),
        ("attention", attention_section, 30),
        ("offload", offload_section, 10),
        ("suite", suite_section, 40),
    ]
    for name, fn, needs in plan:
        if args.only is None or name in args.only:
            results.section(name, s, fn, needs_s=needs)
    sections = results.data["sections"]
    errors = [n for n, e in sections.items() if e["status"] == "error"]
    print(f"\ngpu_check: {len(sections) - len(errors)} of {len(sections)} sections without error "
          f"({', '.join(errors) or 'none failed'}); {time.monotonic() - s.started:.0f} s; results in {s.out}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
