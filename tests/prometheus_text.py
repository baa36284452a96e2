"""Reading a /metrics answer in tests as Prometheus does: prometheus_client's own parser, so a
test checks names, labels and values, not how the text happens to be laid out (label order,
"3" or "3.0", escapes)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample called ``name`` (as written: ``x_total``, ``x_bucket``), by its labels."""
    return {frozenset(s.labels.items()): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels``; None when there is none."""
    return samples(text, name).get(frozenset(labels.items()))


def types(text: str) -> dict[str, str]:
    """Each family's type by the name its ``# TYPE`` line gives (counters with ``_total``)."""
    return {(f.name + "_total" if f.type == "counter" else f.name): f.type
            for f in text_string_to_metric_families(text)}
