"""benchmarks/gpu_check.py, the one prepared GPU run: its dry run on the CPU walks every section, and the
CUDA-event and CUDA-memory paths of the stage clock run here against stand-ins for torch.cuda."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

SECTIONS = ["env", "kernels", "ttft", "kernel_timing", "frames64", "attention", "offload", "suite"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_runs_every_section_without_error(dry_run):
    proc, out, data = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert list(data["sections"]) == SECTIONS
    assert {name: entry["status"] for name, entry in data["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert "8 of 8 sections without error" in proc.stdout
    markdown = (out / "gpu_check.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in SECTIONS)
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md", "kernels.log", "suite_sdpa.log",
                                               "suite_eager.log"}  # at most 8 files come back from the GPU machine


def test_dry_run_ttft_rows_add_up_and_compare_with_the_uncompressed_run(dry_run):
    _, _, data = dry_run
    table = data["sections"]["ttft"]["tiny@8"]["configurations"]
    assert list(table) == list(gpu_check.configurations("tiny"))
    base = table["uncompressed"]
    assert base["speedup"] == 1.0 and base["retained"] == 1.0 and base["token_processing_ms"] == 0.0
    for name, row in table.items():
        parts = row["vision_ms"] + row["token_processing_ms"] + row["prefill_ms"] + row["other_ms"]
        assert parts == pytest.approx(row["ttft_ms"], rel=1e-6), name  # the Figure-3 parts sum to the TTFT
        assert row["speedup"] == pytest.approx(base["ttft_ms"] / row["ttft_ms"])
        assert row["flops_speedup"] == pytest.approx(base["exact_T"] / row["exact_T"])
        assert len(row["ttft_runs_ms"]) == 1
    assert table["earlytom_10"]["retained"] < 0.2 and table["earlytom_10"]["exact_T"] < base["exact_T"]
    assert table["fastv_10"]["retained"] == 1.0  # FastV prunes inside the LLM: all tokens reach it
    targets = data["sections"]["ttft"]["tiny@8"]["targets"]
    assert targets["earlytom_10_speedup"] == table["earlytom_10"]["speedup"] and "offload_gain" in targets


def test_dry_run_checks_kernels_suite_and_attention_backends(dry_run):
    _, _, data = dry_run
    sections = data["sections"]
    assert sections["kernels"]["rc"] == 0 and sections["kernels"]["passed"] >= 5
    for attn in ("sdpa", "eager"):
        run = sections["suite"]["runs"][attn]
        assert run["rc"] == 0 and run["passed"] == 1 and not run["failed"], run
    used = sections["kernel_timing"]["at_calls"]  # the kernels timed at the sizes the ttft runs used
    assert {r["op"] for r in used} >= {"frame_cosine", "window_argmax", "scatter_mean"}
    assert all(r["calls"] >= 1 and r["torch_us"] > 0 for r in used)
    assert sections["attention"]["agree"] is True
    assert set(sections["attention"]["outcomes"]) == {"sdpa (default)", "sdpa math", "eager"}
    assert set(sections["frames64"]["configurations"]) == {"uncompressed", "earlytom_10", "earlytom_25"}
    assert all(entry["gain"] > 0 for entry in sections["offload"].values() if isinstance(entry, dict))


def test_configurations_are_table_1_settings_with_fastv_and_the_offloaded_variant():
    table = yaml.safe_load((ROOT / "experiments" / "paper_table1.yaml").read_text())["configurations"]
    configs = gpu_check.configurations("llava-onevision-7b")
    assert list(configs) == ["uncompressed", "earlytom_10", "visionzip_10", "holitom_10", "fastv_10", "earlytom_25",
                             "visionzip_25", "holitom_25", "fastv_25", "earlytom_10_offload"]
    for name in ("earlytom_10", "visionzip_25", "holitom_10"):
        assert configs[name] == table[name]["strategies"]
    assert configs["fastv_25"] == [{"name": "fastv", "params": {"layer": 2, "ratio": 0.25}}]
    offloaded = [s for s in configs["earlytom_10_offload"] if s["name"] == "earlytom.decoupled_select"]
    assert offloaded[0]["params"]["offload_static"] is True
    assert "offload_static" not in str(configs["earlytom_10"])  # the plain configuration is left as it was
    tiny = gpu_check.configurations("tiny")
    assert tiny["earlytom_10"][0]["params"]["layers"] == [1, 2] and tiny["holitom_10"][1]["params"]["layer"] == 2


def test_full_check_on_a_cpu_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "add --dry-run" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--models", "tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "PRESET:FRAMES[:IMAGE_SIZE], got 'tiny'" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cuda", "--out", str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "torch sees no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage: bash benchmarks/gpu_check.sh OUT" in proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    settings = gpu_check.Settings("cpu", True, tmp_path, 100.0, [("tiny", 8, None)], None, ("tiny", 8, None), 1, 1, 1, [], [],
                                  10, "float32")
    results = gpu_check.Results(tmp_path)

    def broken(s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    results.section("ttft", settings, broken)
    results.section("offload", settings, lambda s: ({"x": 1}, "fine"))
    results.section("suite", settings, lambda s: ({}, ""), needs_s=1e9)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["sections"]["ttft"]["status"] == "error" and "illegal memory access" in data["sections"]["ttft"]["error"]
    assert data["sections"]["offload"] == {"status": "ok", "x": 1, "seconds": data["sections"]["offload"]["seconds"]}
    assert data["sections"]["suite"]["status"] == "skipped"
    assert "## ttft: error" in (tmp_path / "gpu_check.md").read_text()


class FakeEvent:
    """torch.cuda.Event as the stage clock uses it: record() takes a time stamp (here from a counter the
    test advances), elapsed_time() is only valid once synchronised, as on a GPU."""

    now = 0.0
    synchronised = False

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at = None

    def record(self) -> None:
        self.at = FakeEvent.now

    def elapsed_time(self, end: FakeEvent) -> float:
        assert FakeEvent.synchronised, "CUDA events read before torch.cuda.synchronize()"
        return end.at - self.at


def test_stage_clock_on_cuda_reads_events_after_one_synchronisation(monkeypatch):
    from tokcomp.timing import StageClock

    syncs = []

    def synchronize():
        syncs.append(1)
        FakeEvent.synchronised = True

    FakeEvent.now, FakeEvent.synchronised = 0.0, False
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    clock = StageClock("cuda")
    assert clock.cuda
    with clock.stage("ttft"):
        FakeEvent.now += 1.0  # other
        with clock.stage("vision"):
            FakeEvent.now += 5.0
            with clock.stage("token_processing"):
                FakeEvent.now += 0.5
        with clock.stage("prefill"):
            FakeEvent.now += 3.0
    assert not syncs  # nothing waits for the GPU while the stages run
    assert clock.exclusive_ms() == {"ttft": 1.0, "vision": 5.0, "token_processing": 0.5, "prefill": 3.0}
    assert clock.inclusive_ms("ttft") == 9.5
    assert len(syncs) == 2


def test_peak_memory_on_cuda_is_the_allocator_peak_above_the_start(monkeypatch):
    from tokcomp.timing import PeakMemory

    state = {"allocated": 3 * 2**20, "peak": 10 * 2**20, "resets": 0}

    def reset():
        state["resets"] += 1
        state["peak"] = state["allocated"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    with PeakMemory("cuda") as peak:
        state["peak"] = 7 * 2**20  # 4 MiB more at the highest point of the block
    assert state["resets"] == 1 and peak.peak_mb == 4.0
