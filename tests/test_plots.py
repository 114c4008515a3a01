"""Report figures stay readable with many configurations: no label printed over another."""

from __future__ import annotations

import itertools

from matplotlib.text import Text

from tokcomp import plots
from tokcomp.report import Row


def _rows(count: int) -> list[Row]:
    """A baseline and ``count`` configurations crowded on few distinct costs and fidelities, as a
    paper table's methods at four ratios are."""
    rows = [Row("r0", "uncompressed", "uncompressed", "", "FINISHED", "", True, "none", 0,
                {"flops.paper.total_T": 10.0, "ttft.total_ms": 100.0, "fidelity.top1_agreement": 1.0})]
    for i in range(count):
        rows.append(Row(f"r{i + 1}", f"method{i % 6}_{25 - 5 * (i // 6)}", f"method{i % 6}_{25 - 5 * (i // 6)}", "",
                        "FINISHED", "", False, "s", i + 1,
                        {"flops.paper.total_T": 5.0 + 0.01 * (i % 4), "ttft.total_ms": 50.0 + (i % 5),
                         "fidelity.top1_agreement": 0.25 * (i % 3)}))
    return rows


def _labels(fig) -> list[list[Text]]:
    return [[t for t in ax.texts if t.get_visible()] for ax in fig.axes]


def test_pareto_labels_never_overlap_with_24_configurations(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, omitted: figures.append(fig))
    plots.plot_pareto(_rows(24), tmp_path / "pareto.png")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    for texts in _labels(fig):
        boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the words (leader lines may cross)
        assert boxes, "every panel labels its points"
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    key = [t.get_text() for t in fig.texts]
    assert any("method0_25" in text for text in key)  # many configurations: numbered points and a key


def test_pareto_names_points_directly_when_there_are_few(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, omitted: figures.append(fig))
    plots.plot_pareto(_rows(4), tmp_path / "pareto.png")
    names = " ".join(t.get_text() for texts in _labels(figures[0]) for t in texts)
    assert "method1_25" in names and not any("method" in t.get_text() for t in figures[0].texts)
