"""Counters and histograms kept in plain dicts, made into Prometheus families when scraped.

prometheus_client's metric objects take a lock on every update; on the
gateway's hot paths that cost more than the rest of a request's bookkeeping.
The exposition is the same but for the ``_created`` samples.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

Labels = tuple[str, ...]


class Histogram:
    """Observations counted per bucket; ``le``: a value equal to a bound is inside it."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as prometheus_client writes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for le, n in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class Histograms:
    """One ``Histogram`` per label values."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.by_labels: dict[Labels, Histogram] = {}

    def observe(self, labels: Labels, value: float) -> None:
        hist = self.by_labels.get(labels)
        if hist is None:
            hist = self.by_labels[labels] = Histogram(self.bounds)
        hist.observe(value)

    def family(self, name: str, doc: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, hist in list(self.by_labels.items()):
            family.add_metric(list(labels), hist.cumulative(), hist.total)
        return family


class SidLabels:
    """Bounds the ``sid`` label: the first ``limit`` serverless ids seen keep their own
    value, later ones share ``OTHER`` (not a valid serverless id, so never a real one).
    Without it, every id ever seen adds series to every scrape for the process's life."""

    OTHER = "_other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, sid: str) -> str:
        if sid in self.known:
            return sid
        if len(self.known) < self.limit:
            self.known.add(sid)
            return sid
        return self.OTHER


def count(counts: dict[Labels, int], labels: Labels) -> None:
    counts[labels] = counts.get(labels, 0) + 1


def counter_family(name: str, doc: str, label_names: list[str],
                   counts: dict[Labels, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=label_names)
    for labels, n in list(counts.items()):
        family.add_metric(list(labels), n)
    return family
