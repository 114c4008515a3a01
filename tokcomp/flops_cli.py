"""``tokcomp flops``: analytic FLOPs without weights or video.

Two forms: ``--model PRESET --frames N`` (the uncompressed model, or an explicit schedule given by
``--visual-tokens``, ``--vision-frames-after`` and ``--llm-stage``), and ``EXPERIMENT.yaml`` (each
configuration's declared schedule, or the ledgers of a finished run with ``--from-run``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokcomp.errors import ConfigError, TokcompError
from tokcomp.flops import count_all
from tokcomp.ledger import TokenLedger
from tokcomp.tables import render_table

PROTOCOLS = ("paper", "exact")


def _pair(text: str, cast) -> tuple[int, Any]:
    try:
        a, b = text.split(":")
        return int(a), cast(b)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:VALUE") from exc


def add_flops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", help="experiment YAML (else --model)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the experiment")
    parser.add_argument("--model", help="model preset, for the uncompressed model or an explicit schedule")
    parser.add_argument("--frames", type=int, help="frames (with --model; default: the preset's, 32 for "
                                                    "LLaVA-OneVision, 64 for LLaVA-Video)")
    parser.add_argument("--weights", default="random", help="with --model: random (default), pretrained or a path")
    parser.add_argument("--text-tokens", type=int, help="prompt text tokens (default: counted from the prompt)")
    parser.add_argument("--visual-tokens", type=int, help="video tokens reaching the LLM (special tokens excluded)")
    parser.add_argument("--height", type=int, help="with --model: video height in pixels (models whose grid follows it)")
    parser.add_argument("--width", type=int, help="with --model: video width in pixels")
    parser.add_argument("--vision-frames-after", action="append", default=[], metavar="LAYER:FRAMES",
                        type=lambda t: _pair(t, int), help="frames alive after a vision layer (repeatable)")
    parser.add_argument("--llm-stage", action="append", default=[], metavar="LAYER:RATIO",
                        type=lambda t: _pair(t, float), help="from this decoder layer keep RATIO of the video tokens")
    parser.add_argument("--from-run", metavar="RUN_ID", help="use the ledgers of a finished run (parent or child)")
    parser.add_argument("--nominal", action="store_true",
                        help="count data-dependent pre-LLM strategies at the token budget they target "
                             "(as the papers' FLOPs columns do) instead of refusing them")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both")
    parser.add_argument("--json", action="store_true", help="JSON output")


def _spec(args: argparse.Namespace):
    from tokcomp.config import ModelConfig

    return ModelConfig(preset=args.model, weights=args.weights)


def model_rows(args: argparse.Namespace) -> dict[str, tuple[TokenLedger, Any]]:
    from tokcomp.plan import prompt_text_tokens, schedule_ledger
    from tokcomp.plugins import Plugins
    from tokcomp.preflight import check_weights

    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {args.frames}")
    for option in ("height", "width", "text_tokens"):
        value, least = getattr(args, option), 0 if option == "text_tokens" else 1
        if value is not None and value < least:
            raise ConfigError(f"--{option.replace('_', '-')} must be at least {least}, got {value}")
    preset = Plugins().model(args.model)
    check_weights(args.weights, preset, what="--weights")
    if args.frames is None:
        args.frames = preset.frames
    description = preset.describe(_spec(args))
    text = args.text_tokens
    if text is None:
        text = prompt_text_tokens(description, "Describe what happens in the video.", args.frames, args.height,
                                  args.width)
    ledger = schedule_ledger(description, args.frames, text, visual_tokens=args.visual_tokens,
                             vision_frames_after=args.vision_frames_after, llm_stages=args.llm_stage,
                             height=args.height, width=args.width)
    return {args.model: (ledger, description.dims)}


def experiment_rows(args: argparse.Namespace) -> dict[str, tuple[TokenLedger | str, Any]]:
    from tokcomp.config import load_experiment
    from tokcomp.plan import ScheduleUnknown, plan_ledger, prompt_text_tokens
    from tokcomp.plugins import Plugins
    from tokcomp.preflight import check_experiment, check_tracking_uri
    from tokcomp.runner import build_strategies

    cfg = load_experiment(args.experiment, args.overrides)
    plugins = Plugins(list(cfg.plugins))
    preset = plugins.model(cfg.model.preset)
    check_experiment(cfg, preset, args.experiment, run=False)
    if args.text_tokens is not None and args.text_tokens < 0:
        raise ConfigError(f"--text-tokens must be at least 0, got {args.text_tokens}")
    if args.from_run:
        check_tracking_uri(cfg.tracking.uri, must_exist=True)
    description = preset.describe(cfg.model)
    dims = description.dims
    height, width = _video_size(cfg)
    text = args.text_tokens if args.text_tokens is not None else prompt_text_tokens(
        description, cfg.input.prompt, cfg.input.frames, height, width)
    video = description.video(cfg.input.frames, height, width)
    info = description.info.for_video(video.grid, video.llm_grid)
    recorded = _recorded_ledgers(cfg, args.from_run) if args.from_run else {}
    rows: dict[str, tuple[TokenLedger | str, Any]] = {}
    for name, strategies in build_strategies(plugins, cfg).items():
        for strategy in strategies:
            strategy.check_model(info)
            strategy.check(info)
        if name in recorded:
            rows[name] = (recorded[name], dims)
            continue
        try:
            rows[name] = (plan_ledger(description, cfg.input.frames, text, strategies, nominal=args.nominal,
                                      height=height, width=width), dims)
        except ScheduleUnknown as exc:
            rows[name] = (str(exc), dims)
    return rows


def _video_size(cfg) -> tuple[int, int]:
    """The input video's (height, width): the generated clip's, or a video file's first frame."""
    if cfg.input.video is None:
        return cfg.input.generated.height, cfg.input.generated.width
    from tokcomp.video import video_size

    return video_size(cfg.input.video)


def _recorded_ledgers(cfg, run_id: str) -> dict[str, TokenLedger]:
    """Ledgers by configuration name from a finished run: a parent's children, or one child."""
    from tokcomp.tracking import Tracker, resolve_tracking_uri

    tracker = Tracker(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment or cfg.name)
    try:
        run = tracker.client.get_run(run_id)
    except Exception as exc:
        raise ConfigError(f"--from-run {run_id!r}: no such run at {tracker.uri}") from exc
    if run.data.tags.get("tokcomp.kind") == "configuration":
        runs = [run]
    else:
        runs = tracker.client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                          order_by=["attributes.start_time ASC"])
    ledgers = {}
    for child in runs:
        if child.info.status == "FINISHED" and child.data.tags.get("tokcomp.configuration"):
            data = tracker.load_json(child.info.run_id, "ledger.json")
            ledgers[child.data.tags["tokcomp.configuration"]] = TokenLedger.from_dict(data)
    if not ledgers:
        raise ConfigError(f"--from-run {run_id!r} has no finished configuration with a ledger")
    return ledgers


def cmd_flops(args: argparse.Namespace) -> int:
    if (args.experiment is None) == (args.model is None):
        raise ConfigError("give either an experiment YAML or --model PRESET")
    if args.experiment and (args.visual_tokens is not None or args.vision_frames_after or args.llm_stage):
        raise ConfigError("--visual-tokens, --vision-frames-after and --llm-stage go with --model")
    if args.model and args.from_run:
        raise ConfigError(f"--from-run {args.from_run!r} goes with the experiment YAML that made the run "
                          "(its configurations' recorded ledgers); with --model give the schedule instead "
                          "(--vision-frames-after, --visual-tokens, --llm-stage)")
    rows = experiment_rows(args) if args.experiment else model_rows(args)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    results: dict[str, Any] = {}
    for name, (ledger, dims) in rows.items():
        if isinstance(ledger, str):
            results[name] = {"error": ledger}
            continue
        reports = count_all(ledger, dims)
        results[name] = {p: reports[p].to_dict() for p in protocols}
        results[name]["visual_tokens"] = ledger.visual_tokens_after_pre_llm
    if args.json:
        print(json.dumps(results[args.model] if args.model else {"configurations": results}, indent=2))
    else:
        print(flops_table(results, protocols))
    return 0 if all("error" not in r for r in results.values()) else 1


def flops_table(results: dict[str, Any], protocols: tuple[str, ...]) -> str:
    """Per configuration: each protocol's vision / LLM / total T and its share of the first row's total."""
    header = ["configuration", "visual tok"]
    for p in protocols:
        header += [f"{p} vision T", f"{p} LLM T", f"{p} total T", f"{p} %"]
    if "exact" in protocols:
        header += ["exact projector T", "decode GFLOPs/token"]
    reference = next((r for r in results.values() if "error" not in r), None)
    rows, notes = [], []
    for name, r in results.items():
        if "error" in r:
            notes.append(f"{name}: {r['error']}")
            rows.append([name] + ["-"] * (len(header) - 1))
            continue
        row = [name, str(r["visual_tokens"])]
        for p in protocols:
            share = 100 * r[p]["total_T"] / reference[p]["total_T"] if reference[p]["total_T"] else 0.0
            row += [f"{r[p]['vision_T']:.4g}", f"{r[p]['llm_T']:.4g}", f"{r[p]['total_T']:.4g}", f"{share:.1f}%"]
        if "exact" in protocols:
            row += [f"{r['exact']['projector_T']:.4g}", f"{1e3 * r['exact']['decode_per_token_T']:.4g}"]
        rows.append(row)
    return "\n".join([render_table(header, rows), *notes])


__all__ = ["add_flops_arguments", "cmd_flops", "TokcompError"]
