"""Prometheus text exposition, parsed: the router reads vLLM pods' /metrics with it, and the
devtools' metric helpers (tests, benchmarks) build on it. Production code imports it from here,
never from `devtools`."""

from __future__ import annotations

# {(sample name, frozenset of (label, value) items): value}
MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus_text(text: str, only: tuple[str, ...] | None = None) -> MetricSamples:
    """Parse Prometheus text exposition: {(sample name, frozenset of label items): value}.

    With `only`, just the lines starting with one of these names are parsed (a vLLM page is
    mostly histograms a caller does not need, and a line it does not read cannot fail it).

    Raises ValueError on text that is not in the exposition format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    if only is not None:
        text = "\n".join(line for line in text.splitlines() if line.startswith(only)) + "\n"
    samples: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples
