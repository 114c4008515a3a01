"""The ``tokcomp`` command: list what is registered, run, sweep and evaluate experiments, compare them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from tokcomp.errors import TokcompError
from tokcomp.tables import render_table


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _executor_options(parser: argparse.ArgumentParser, unit: str) -> None:
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help=f"local: in this process (default); ray: {unit} as tasks on a Ray cluster, "
                             "logging to an MLflow tracking server (tracking.uri=http://...)")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
                        help="the Ray cluster (default: $RAY_ADDRESS, else a new local one on this machine)")


def cmd_list(args: argparse.Namespace) -> int:
    from tokcomp.plugins import Plugins

    plugins = Plugins(args.plugin, trace=args.trace_hooks)
    if args.what == "strategies":
        rows = []
        families: dict[str, frozenset[str]] = {}
        for reg in plugins.models.values():
            families.setdefault(reg.obj.family, frozenset(reg.obj.capabilities))
        for name in Plugins.matching(plugins.strategies, args.pattern):
            reg = plugins.strategies[name]
            params = ", ".join(f"{k}={_default(f)!r}" for k, f in reg.obj.parameters().items())
            needs = reg.obj.required_capabilities()
            served = sorted(f for f, caps in families.items() if needs <= caps)
            models = "all" if len(served) == len(families) else (",".join(served) or "none")
            rows.append([name, ",".join(reg.obj.hook_points()), models, reg.plugin, reg.distribution, params,
                         reg.obj.summary])
        print(render_table(["strategy", "hook points", "models", "plugin", "from", "parameters (defaults)", "summary"],
                           rows))
    else:
        rows = []
        for name in Plugins.matching(plugins.models, args.pattern):
            reg = plugins.models[name]
            preset = reg.obj
            rows.append([name, preset.family, preset.dims.get("vision", ""), preset.dims.get("llm", ""),
                         _checkpoint_label(preset.hub_id), reg.plugin, preset.summary])
        print(render_table(["model", "family", "vision", "llm", "checkpoint", "plugin", "summary"], rows))
    if not rows:
        print(f"(nothing matches {args.pattern!r})", file=sys.stderr)
        return 1
    return 0


def _checkpoint_label(source: str | None) -> str:
    """A hub id as it is; a checkpoint shipped inside the package as ``bundled``."""
    if source is None:
        return "-"
    from pathlib import Path

    return "bundled" if Path(source).is_absolute() else source


def cmd_run(args: argparse.Namespace) -> int:
    from tokcomp.config import load_experiment, to_yaml
    from tokcomp.preflight import check_experiment, check_experiment_file
    from tokcomp.runner import ExperimentRunner, format_table

    check_experiment_file(args.experiment)
    cfg = load_experiment(args.experiment, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    check_experiment(cfg, experiment_file=args.experiment)  # before the tracking store or a results folder
    if args.executor == "ray":  # one task per configuration; resumable like a sweep of one point
        from tokcomp.sweep import SweepRunner

        sweep = SweepRunner(args.experiment, args.overrides, trace=args.trace_hooks, resume=args.resume or None,
                            executor="ray", address=args.address, grid=False)
        result = sweep.run(log=tqdm_write, progress=not args.no_progress)
    else:
        runner = ExperimentRunner(cfg, trace=args.trace_hooks, experiment_file=args.experiment)
        result = runner.run(log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(result.configurations))
    uri = result.tracking_uri or ""
    browse = uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    return _ending(result, f"parent run {result.parent_run_id} in experiment {cfg.tracking.experiment or cfg.name!r} "
                           f"at {uri}  (browse: {browse})", "errors logged to their MLflow runs")


def _ending(result, tracked: str, failed_hint: str) -> int:
    """The last lines of run, sweep and eval: where the runs are, what failed (exit 1)."""
    if result.tracking_uri:
        print(f"\nMLflow: {tracked}")
    if result.failed:
        print(f"failed: {', '.join(result.failed)} ({failed_hint})", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tokcomp.preflight import check_experiment_file
    from tokcomp.runner import format_table
    from tokcomp.sweep import SweepRunner

    check_experiment_file(args.experiment)
    sweep = SweepRunner(args.experiment, args.overrides, trace=args.trace_hooks, resume=args.resume or None,
                        executor=args.executor, address=args.address)
    check_sweep(sweep)
    result = sweep.run(log=lambda msg: tqdm_write(msg), progress=not args.no_progress)
    print(format_table(result.configurations))
    return _ending(result, f"sweep parent run {result.parent_run_id} at {result.tracking_uri}",
                   "run the same command again to retry them")


def check_sweep(sweep) -> None:
    """Each point's config checked before the sweep's parent run exists: a strategy that cannot be built
    (an unknown name or parameter, in any point) is refused; a sweep none of whose points passes the
    other checks is refused with the first point's error (a mix runs, and records the bad points)."""
    from tokcomp.config import load_experiment
    from tokcomp.plugins import Plugins
    from tokcomp.preflight import check_experiment
    from tokcomp.runner import build_strategies

    errors = []
    for point in sweep.points:
        cfg = load_experiment(sweep.experiment_file, [*sweep.fixed, *point])
        plugins = Plugins(list(cfg.plugins))
        preset = plugins.model(cfg.model.preset)
        build_strategies(plugins, cfg)
        try:
            check_experiment(cfg, preset, experiment_file=sweep.experiment_file)
        except TokcompError as exc:
            errors.append(exc)
    if errors and len(errors) == len(sweep.points):
        raise errors[0]


def cmd_eval(args: argparse.Namespace) -> int:
    from tokcomp.evaluation import Evaluation, accuracy_table

    evaluation = Evaluation(args.experiment, args.data, args.overrides, scoring=args.scoring, limit=args.limit,
                            resume=args.resume or None, trace=args.trace_hooks, executor=args.executor,
                            address=args.address)
    result = evaluation.run(log=tqdm_write, progress=not args.no_progress)
    print(f"{result.name}: {len(evaluation.samples)} samples of {args.data}, scoring: {args.scoring}")
    print(accuracy_table(result.configurations, result.kinds))
    print("accuracy: % of all samples (a failed sample counts as wrong); retained, LLM visual, TTFT, FLOPs: "
          "per-sample means")
    return _ending(result, f"evaluation parent run {result.parent_run_id} at {result.tracking_uri} (per-sample "
                           f"predictions: predictions.jsonl of each configuration's run; report: tokcomp compare "
                           f"{result.parent_run_id} --tracking-uri {result.tracking_uri})",
                   "run the same command again to retry them")


def cmd_train_tiny(args: argparse.Namespace) -> int:
    from tokcomp.train_tiny import TrainSettings, train

    given = {k: getattr(args, k) for k in ("steps", "batch", "lr", "seed") if getattr(args, k) is not None}
    settings = TrainSettings(**given)
    report = train(args.out, settings, log=tqdm_write)
    rows = [[name, *(f"{100 * acc:.0f}%" for acc in scores.values())] for name, scores in report["held_out"].items()]
    kinds = list(next(iter(report["held_out"].values())))
    print(render_table(["held-out", *kinds], rows))
    print(f"saved to {args.out} ({report['seconds']:.0f} s); use it with model.preset=tiny-synth "
          f"model.weights={args.out}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from collections import Counter

    from tokcomp.synth import write_dataset

    path = write_dataset(args.out, args.n, seed=args.seed, frames=args.frames, size=args.size)
    kinds = Counter(json.loads(line)["type"] for line in path.read_text().splitlines())
    print(f"wrote {sum(kinds.values())} samples to {path} ({', '.join(f'{k} {v}' for k, v in kinds.items())})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tokcomp.preflight import check_experiment_file, check_tracking_uri
    from tokcomp.report import _configured_uri, _is_yaml
    from tokcomp.report import cmd_compare as compare

    if args.target is not None and _is_yaml(args.target):
        check_experiment_file(args.target)
    check_tracking_uri(args.tracking_uri or _configured_uri(args.target), must_exist=True)
    return compare(args)


def tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with tokcomp's error format: one line naming the bad argument, and where help is."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _trace_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--trace-hooks", action="store_true", default=default,
                        help="print every plugin hook call, with shapes and counts (also: TOKCOMP_TRACE_HOOKS=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="tokcomp", description=__doc__)
    _trace_option(parser, None)
    # global options work after the subcommand too (``tokcomp run --trace-hooks X.yaml``)
    common = argparse.ArgumentParser(add_help=False)
    _trace_option(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,run,sweep,eval,flops,compare,data,train-tiny}")

    p_list = sub.add_parser("list", parents=[common], help="list registered strategies or model presets")
    p_list.add_argument("what", choices=["strategies", "models"])
    p_list.add_argument("pattern", nargs="?", default=None, help="wildcard pattern, e.g. 'fast*'")
    p_list.add_argument("--plugin", action="append", default=[], metavar="FILE", help="also load a local plugin file")
    p_list.set_defaults(func=cmd_list)

    p_run = sub.add_parser("run", parents=[common], help="run an experiment YAML, with key=value overrides")
    p_run.add_argument("experiment", help="experiment YAML file")
    p_run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. input.frames=8 model.dtype=bfloat16")
    p_run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _executor_options(p_run, "each configuration")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar (--executor ray)")
    p_run.add_argument("--resume", action="store_true",
                       help="--executor ray: take over runs of this run left RUNNING by a process on another host")
    p_run.set_defaults(func=cmd_run)

    p_sweep = sub.add_parser("sweep", parents=[common],
                             help="run a grid of comma-list overrides as one resumable parent run")
    p_sweep.add_argument("experiment", help="experiment YAML file")
    p_sweep.add_argument("overrides", nargs="*", help="e.g. configurations.c.strategies.0.params.ratio=0.25,0.1")
    p_sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_sweep.add_argument("--resume", action="store_true",
                         help="take over runs of this sweep left RUNNING by a process on another host")
    _executor_options(p_sweep, "each configuration of each point")
    p_sweep.set_defaults(func=cmd_sweep)

    p_eval = sub.add_parser("eval", parents=[common],
                            help="accuracy and efficiency of every configuration on a video-QA file (JSONL)")
    p_eval.add_argument("experiment", help="experiment YAML file")
    p_eval.add_argument("overrides", nargs="*", help="dotted overrides, e.g. input.frames=8")
    p_eval.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help="one JSON object per line: id, video (path relative to the file), question, "
                             "options (multiple choice) or none (free form), answer")
    p_eval.add_argument("--scoring", choices=["generate", "loglikelihood"], default="generate",
                        help="multiple choice: parse the option letter from the generated answer (default), or "
                             "rank the options by the log-probability of their letter")
    p_eval.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_eval.add_argument("--resume", action="store_true",
                        help="take over runs of this evaluation left RUNNING by a process on another host")
    _executor_options(p_eval, "each configuration's samples in shards")
    p_eval.set_defaults(func=cmd_eval)

    from tokcomp.flops_cli import add_flops_arguments, cmd_flops

    p_flops = sub.add_parser("flops", parents=[common],
                             help="analytic FLOPs (paper and exact protocols), no weights or video needed")
    add_flops_arguments(p_flops)
    p_flops.set_defaults(func=cmd_flops)

    from tokcomp.report import add_compare_arguments

    p_compare = sub.add_parser("compare", parents=[common],
                               help="compare the configurations of a run or sweep from MLflow: table and plots")
    add_compare_arguments(p_compare)
    p_compare.set_defaults(func=cmd_compare)

    p_train = sub.add_parser("train-tiny", parents=[common],
                             help="train the tiny-synth model on the synthetic video-QA set (reproduces the "
                                  "bundled checkpoint)")
    p_train.add_argument("--out", required=True, help="checkpoint folder to write")
    # defaults: tokcomp.train_tiny.TrainSettings (not imported here: it needs torch)
    p_train.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the bundled model's)")
    p_train.add_argument("--batch", type=int, default=None, help="clips per step (one question type per step, types in turn)")
    p_train.add_argument("--lr", type=float, default=None, help="learning rate (constant)")
    p_train.add_argument("--seed", type=int, default=None)
    p_train.set_defaults(func=cmd_train_tiny)

    p_data = sub.add_parser("data", parents=[common], help="make data sets (the synthetic video-QA benchmark)")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, metavar="{synth}")
    p_synth = data_sub.add_parser("synth", parents=[common],
                                  help="generate the synthetic video-QA set: videos/*.mp4 and data.jsonl")
    p_synth.add_argument("--out", required=True, help="output folder (created)")
    p_synth.add_argument("--n", type=int, default=200, help="number of samples (question types in turn)")
    p_synth.add_argument("--seed", type=int, default=0)
    p_synth.add_argument("--frames", type=int, default=16, help="frames per clip")
    p_synth.add_argument("--size", type=int, default=112, help="frame side in pixels (even)")
    p_synth.set_defaults(func=cmd_data_synth)
    return parser


def _place_extras(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """Positionals given after an option (``list strategies --plugin f.py 'keep*'``, ``run X.yaml
    --print-config a=b``): argparse leaves them over; they belong to the trailing positional."""
    unknown = [e for e in extras if e.startswith("-") and e != "-"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(extras)
    elif args.command == "list" and args.pattern is None and len(extras) == 1:
        args.pattern = extras[0]
    elif args.command == "compare" and args.target is None and len(extras) == 1:
        args.target = extras[0]
    else:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")


def one_line(exc: BaseException) -> str:
    """An error message on one line (YAML parser messages span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            _place_extras(parser, args, extras)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    from omegaconf.errors import OmegaConfBaseException

    try:
        return args.func(args)
    except KeyboardInterrupt:  # runs in progress were already marked KILLED by the runner
        print("tokcomp: interrupted (runs in progress are marked KILLED; a sweep resumes where it stopped)",
              file=sys.stderr)
        return 130
    except (TokcompError, OmegaConfBaseException) as exc:  # OmegaConf: a config value a check did not foresee
        print(f"tokcomp: error: {one_line(exc) if isinstance(exc, TokcompError) else str(exc).splitlines()[0]}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
