"""Report figures: where time to first token goes, cost against fidelity, and tokens alive per layer.

Figures are built on matplotlib's object API with the Agg canvas, never through ``pyplot``: no
global figure state and no display needed, so a report renders the same on a headless server.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator, StrMethodFormatter
from matplotlib.transforms import Bbox

from tokcomp.report import Row, baselines, speedup

# Okabe-Ito: distinguishable with the common colour-vision deficiencies. (metric, name, fill, text on it)
TTFT_PARTS = (
    ("ttft.vision_ms", "vision encoding", "#0072B2", "white"),
    ("ttft.token_processing_ms", "visual token processing", "#E69F00", "black"),
    ("ttft.prefill_ms", "LLM prefill", "#009E73", "white"),
    ("ttft.other_ms", "other (overhead)", "#BBBBBB", "black"),
)
# Okabe-Ito without its yellow (unreadable as a thin line on white), then three of Paul Tol's.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255", "#999933",
          "#44AA99")
LINESTYLES = ("-", "--", "-.", ":")
# Label positions around a point (points), tried in order.
LABEL_OFFSETS = ((6, 4), (6, -4), (-6, 4), (-6, -4), (8, 0), (-8, 0), (6, 14), (6, -14), (-6, 14), (-6, -14),
                 (6, 24), (6, -24), (-6, 24), (-6, -24), (0, 34), (0, -34), (20, 34), (-20, 34), (20, -34),
                 (-20, -34), (0, 46), (0, -46), (24, 46), (-24, 46), (24, -46), (-24, -46))
NUMBERED_ABOVE = 8  # more configurations than this: points carry numbers, a key lists the names
COST_AXES = (
    ("flops.paper.total_T", "FLOPs, paper protocol: vision + LLM prefill (T)"),
    ("ttft.total_ms", "time to first token (ms)"),
)


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, path: Path, omitted: list[Row]) -> None:
    if omitted:
        names = ", ".join(f"{r.label} ({r.status})" for r in omitted)
        # Above the title (bbox_inches="tight" grows the image to fit): at the bottom, constrained
        # layout puts figure legends on the same line.
        fig.text(0.01, 1.01, textwrap.fill(f"not shown (no data): {names}", 160), fontsize=8, color="#555555",
                 va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _no_data(path: Path, title: str, why: str) -> None:
    fig, (ax,) = _figure(7, 2.5)
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    _save(fig, path, [])


def _split(rows: list[Row], usable: Callable[[Row], bool]) -> tuple[list[Row], list[Row]]:
    shown = [r for r in rows if r.finished and usable(r)]
    return shown, [r for r in rows if r not in shown]


# --- TTFT breakdown (the paper's Figure 3) -----------------------------------------------------

def plot_ttft_breakdown(rows: list[Row], path: Path) -> None:
    """One stacked horizontal bar per configuration: which stage the time to first token goes to."""
    title = "Time to first token, by stage"
    shown, omitted = _split(rows, lambda r: r.metrics.get("ttft.total_ms") is not None)
    if not shown:
        return _no_data(path, title, "no finished configuration recorded ttft.total_ms")
    fig, (ax,) = _figure(10, 1.6 + 0.42 * len(shown))
    totals = [r.metrics["ttft.total_ms"] for r in shown]
    left = [0.0] * len(shown)
    for key, name, color, text_color in TTFT_PARTS:
        widths = [r.metrics.get(key, 0.0) for r in shown]
        bars = ax.barh(range(len(shown)), widths, left=left, height=0.62, color=color, label=name)
        shares = [f"{w / t:.0%}" if w >= 0.07 * max(totals) else "" for w, t in zip(widths, totals, strict=True)]
        ax.bar_label(bars, shares, label_type="center", fontsize=8, color=text_color)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    _total_labels(ax, shown, left)
    for y in range(1, len(shown)):
        if shown[y].point != shown[y - 1].point:  # sweep points apart: each compares with its own baseline
            ax.axhline(y - 0.5, color="#888888", lw=0.8)
    _label_configurations(ax, shown)
    ax.set_xlim(0, 1.28 * max(max(left), *totals))
    ax.set_xlabel("time to first token (ms; stages and total are medians over the timed repeats)")
    fig.suptitle(title)
    ax.set_title("in the bars: share of the total; after them: total ms (whisker: min-max over repeats) "
                 "and speedup over the baseline", fontsize=9)
    fig.legend(loc="outside lower center", ncols=len(TTFT_PARTS), fontsize=9, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    _save(fig, path, omitted)


def _total_labels(ax: Axes, shown: list[Row], stacked: list[float]) -> None:
    bases = baselines(shown)
    for y, (row, end) in enumerate(zip(shown, stacked, strict=True)):
        total = row.metrics["ttft.total_ms"]
        low, high = row.metrics.get("ttft.total_ms_min"), row.metrics.get("ttft.total_ms_max")
        if low is not None and high is not None:
            ax.errorbar(total, y, xerr=[[total - low], [high - total]], fmt="none", ecolor="black", capsize=3,
                        lw=1)
        high = total if high is None else high
        gain = speedup(row, bases.get(row.point))
        text = f"{total:.1f} ms" + ("" if row.is_baseline or gain is None else f"  x{gain:.2f}")
        ax.text(max(end, high) + 0.01 * ax.get_xlim()[1], y, text, va="center", fontsize=9)


def _label_configurations(ax: Axes, shown: list[Row]) -> None:
    """Configuration names as y ticks, first at the top, the baseline marked and in bold."""
    ax.set_yticks(range(len(shown)), [f"{r.label} (baseline)" if r.is_baseline else r.label for r in shown])
    for tick, row in zip(ax.get_yticklabels(), shown, strict=True):
        tick.set_fontweight("bold" if row.is_baseline else "normal")
    ax.invert_yaxis()


# --- cost against fidelity ---------------------------------------------------------------------

def fidelity_axis(rows: list[Row]) -> tuple[str, Callable[[Row], float | None]]:
    """Accuracy (%) for an evaluation (``tokcomp eval``); else top-1 agreement (%) when recorded, else -KL
    (the baseline is exact by definition: 100%, 0)."""
    if any("accuracy" in r.metrics for r in rows):
        def accuracy(row: Row) -> float | None:
            value = row.metrics.get("accuracy")
            return None if value is None else 100 * value
        samples = max(int(r.metrics.get("eval.samples", 0)) for r in rows)
        return f"accuracy on {samples} samples (%)", accuracy
    if any("fidelity.top1_agreement" in r.metrics for r in rows):
        def top1(row: Row) -> float | None:
            value = 1.0 if row.is_baseline else row.metrics.get("fidelity.top1_agreement")
            return None if value is None else 100 * value
        return "top-1 agreement with the baseline (%)", top1

    def neg_kl(row: Row) -> float | None:
        value = 0.0 if row.is_baseline else row.metrics.get("fidelity.kl")
        return None if value is None else -value
    return "\u2212KL divergence from the baseline (0 = identical)", neg_kl


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (lower) and fidelity (higher), by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, fidelity in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or fidelity > front[-1][1]:
            front.append((cost, fidelity))
    return front


def plot_pareto(rows: list[Row], path: Path) -> None:
    """Cost (FLOPs, TTFT) against fidelity per configuration, with the Pareto front of each sweep point."""
    fid_label, fidelity = fidelity_axis(rows)
    what = "accuracy" if fid_label.startswith("accuracy") else "fidelity"
    title = f"Cost against {what}: up and to the left is better"
    usable = [r for r in rows if r.finished and fidelity(r) is not None]
    if not any(r.metrics.get(key) is not None for r in usable for key, _ in COST_AXES):
        return _no_data(path, title, "no finished configuration recorded both a cost and a fidelity metric")
    fig, axes = _figure(13, 5.6, ncols=2)
    points = sorted({r.point for r in usable}, key=[r.point for r in usable].index)
    colors = {point: COLORS[i % len(COLORS)] for i, point in enumerate(points)}
    # Many configurations crowd their names into each other: then points carry short numbers and a
    # key beside the plots gives the names (the baseline keeps its name).
    numbered = sum(not r.is_baseline for r in usable) > NUMBERED_ABOVE
    names = {id(r): r.configuration for r in usable}
    if numbered:
        others = [r for r in usable if not r.is_baseline]
        names.update({id(r): str(i) for i, r in enumerate(others, 1)})
    for ax, (key, cost_label) in zip(axes, COST_AXES, strict=True):
        for point in points:
            group = [r for r in usable if r.point == point and r.metrics.get(key) is not None]
            _scatter_point(ax, group, key, fidelity, colors[point], names)
        ax.set_xlabel(f"{cost_label}  \u2190 lower is better")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))  # tiny models have tiny FLOPs
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.set_ylabel(f"{fid_label}  \u2191 higher is better")
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.1)
    axes[0].set_title("compute")
    axes[1].set_title("latency")
    handles = _pareto_key(colors)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9)
    if numbered:
        key = [f"{names[id(r)]:>3}  {r.label}" for r in usable if not r.is_baseline]
        rows_per_column = (len(key) + 1) // 2 if len(key) > 24 else len(key)
        columns = ["\n".join(key[i:i + rows_per_column]) for i in range(0, len(key), rows_per_column)]
        for c, text in enumerate(columns):
            fig.text(1.0 + 0.17 * c, 0.5, text, fontsize=8, family="monospace", va="center", ha="left",
                     transform=fig.transFigure)
    fig.suptitle(title if len(points) == 1 else f"{title} (one colour and one Pareto front per sweep point)")
    _declutter_labels(fig, axes)
    _save(fig, path, [r for r in rows if r not in usable])


def _scatter_point(ax: Axes, group: list[Row], key: str, fidelity: Callable[[Row], float | None],
                   color: str, names: dict[int, str]) -> None:
    """One sweep point's configurations (labelled ``names[id(row)]``), its baseline as a star, its
    Pareto front as a step line."""
    if not group:
        return
    xy = [(r.metrics[key], fidelity(r)) for r in group]
    together: dict[tuple[float, float], list[str]] = {}  # configurations on the same spot share one label
    for (x, y), row in zip(xy, group, strict=True):
        marker = dict(s=220, marker="*", edgecolor="black", zorder=4) if row.is_baseline else dict(s=36, zorder=3)
        ax.scatter([x], [y], color=color, **marker)
        together.setdefault((x, y), []).append(names[id(row)])
    for (x, y), labels in together.items():
        ax.annotate(", ".join(labels), (x, y), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=8,
                    arrowprops=dict(arrowstyle="-", color="#888888", lw=0.6, shrinkA=0, shrinkB=4))
    front = pareto_front(xy)
    ax.step(*zip(*front, strict=True), where="post", color=color, lw=1.2, ls="--", alpha=0.8, zorder=2)
    ax.scatter(*zip(*front, strict=True), s=110, facecolor="none", edgecolor=color, lw=1.5, zorder=3)


def _pareto_key(colors: dict[str, str]) -> list[Artist]:
    """What the marks mean (in the point's colour, grey for a sweep), then one colour per sweep point."""
    ink = next(iter(colors.values())) if len(colors) == 1 else "#555555"
    handles: list[Artist] = [
        Line2D([], [], ls="", marker="o", color=ink, label="configuration"),
        Line2D([], [], ls="", marker="*", markersize=14, color=ink, markeredgecolor="black",
               label="baseline (uncompressed)"),
        Line2D([], [], ls="--", color=ink, label="Pareto front"),
        Line2D([], [], ls="", marker="o", markersize=10, markerfacecolor="none", markeredgewidth=1.5, color=ink,
               label="on the Pareto front"),
    ]
    if len(colors) > 1:
        handles += [Patch(color=color, label=point or "(no overrides)") for point, color in colors.items()]
    return handles


def _declutter_labels(fig: Figure, axes: list[Axes]) -> None:
    """Move each point label to the first spot near its point that overlaps no label placed before it.

    Configurations with the same retention often land on the same cost, so labels at one fixed
    offset would print over each other.
    """
    fig.canvas.draw()  # lays the figure out, so extents are final
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        _merge_close_labels(ax)
        frame, placed = ax.get_window_extent(renderer), _marker_boxes(ax)
        for text in ax.texts:
            best: tuple[float, tuple[int, int]] | None = None
            for offset in LABEL_OFFSETS:
                _offset_label(text, offset)
                box = Text.get_window_extent(text, renderer).padded(1)  # the words, not the leader line
                clash = sum(_overlap(box, other) for other in placed) + (0 if _inside(box, frame) else 1e6)
                if best is None or clash < best[0]:
                    best = (clash, offset)
                if clash == 0:
                    break
            _offset_label(text, best[1])  # nothing free: the spot that overlaps least
            placed.append(Text.get_window_extent(text, renderer).padded(1))


def _inside(box: Bbox, frame: Bbox) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area two boxes share (0 when apart)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _merge_close_labels(ax: Axes, pixels: float = 14.0) -> None:
    """Points closer than ``pixels`` on screen get one label listing them all (their own would collide)."""
    kept: list[tuple[tuple[float, float], Text]] = []
    for text in list(ax.texts):
        x, y = ax.transData.transform(text.xy)
        near = next((t for (kx, ky), t in kept if abs(kx - x) <= pixels and abs(ky - y) <= pixels), None)
        if near is None:
            kept.append(((x, y), text))
        else:
            near.set_text(f"{near.get_text()}, {text.get_text()}")
            text.remove()


def _marker_boxes(ax: Axes, half: float = 4.0) -> list[Bbox]:
    """Small boxes around every plotted point, so labels are not placed on top of other points."""
    centres = [ax.transData.transform(xy) for c in ax.collections for xy in c.get_offsets()]
    return [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in centres]


def _offset_label(text: Text, offset: tuple[int, int]) -> None:
    dx, dy = offset
    text.xyann = offset
    text.set_horizontalalignment("left" if dx >= 0 else "right")
    text.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")


# --- tokens alive per layer --------------------------------------------------------------------

def plot_tokens_per_layer(rows: list[Row], path: Path) -> None:
    """Where in the network each configuration removes tokens: vision encoder and LLM decoder layers."""
    title = "Tokens alive per layer"
    shown, omitted = _split(rows, lambda r: bool(r.ledger))
    if not shown:
        return _no_data(path, title, "no finished configuration has a ledger.json artifact")
    curves = (lambda ledger: [e["frames"] * e["tokens_per_frame"] for e in ledger.get("vision_layers", [])],
              lambda ledger: list(ledger.get("llm_layers", [])))
    # The legends sit under the panels: the figure grows with the longer one, so the plots keep
    # their height and nothing runs into the title.
    lines = max(_legend_lines(shown, curve) for curve in curves)
    fig, (vision, llm) = _figure(13, 4.2 + 0.2 * lines, ncols=2)
    _layer_curves(vision, shown, curves[0])
    _layer_curves(llm, shown, curves[1])
    vision.set(title="vision encoder: frames x tokens per frame", xlabel="vision encoder layer",
               ylabel="tokens in (all frames)")
    llm.set(title="LLM decoder: prefill sequence length", xlabel="decoder layer",
            ylabel="sequence length in (all tokens)")
    fig.suptitle(f"{title} (configurations with identical curves share one line)")
    _save(fig, path, omitted)


def _curve_groups(rows: list[Row], curve: Callable[[dict], list[int]]) -> dict[tuple[int, ...], list[str]]:
    """Configurations by identical curve (the baseline marked), in first-seen order."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for row in rows:
        groups.setdefault(tuple(curve(row.ledger)), []).append(f"{row.label} (baseline)" if row.is_baseline
                                                               else row.label)
    return groups


def _legend_lines(rows: list[Row], curve: Callable[[dict], list[int]]) -> int:
    return sum(len(textwrap.wrap(", ".join(labels), 60)) for labels in _curve_groups(rows, curve).values())


def _layer_curves(ax: Axes, rows: list[Row], curve: Callable[[dict], list[int]]) -> None:
    """One step line per distinct curve, its legend entry listing every configuration that has it.

    Many configurations keep the same token counts in one part of the network (all pre-LLM methods
    leave the vision encoder alone); separate lines would hide each other exactly.
    """
    groups = _curve_groups(rows, curve)
    for i, (values, labels) in enumerate(groups.items()):
        # Earlier lines are wider and underneath, so curves that share a stretch stay visible.
        width = 1.5 + 2.5 * (len(groups) - 1 - i) / max(len(groups) - 1, 1)
        ax.plot(range(len(values)), values, drawstyle="steps-post", color=COLORS[i % len(COLORS)], lw=width,
                ls=LINESTYLES[(i // len(COLORS)) % len(LINESTYLES)], zorder=2 + i,
                label=textwrap.fill(", ".join(labels), 60))
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8.5, frameon=False)
