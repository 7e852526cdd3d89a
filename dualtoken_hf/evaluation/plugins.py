"""Pluggable networks: `"package.module:factory"` specs (the one parser of them, for metrics and training losses) and
how a report describes the network used."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class MetricNetwork:
    """A metric's network (or `None` when none is available) and the report entry that describes it.

    Args:
        network: The callable that computes features or distances; `None` skips the metric.
        name: What was used, e.g. `"inception-2015-12-05 (TorchScript)"` or the factory spec.
        standard: Whether the number is comparable with published values (standard weights and protocol).
        note: Why the metric was skipped, or how it departs from the standard.
    """

    network: Callable | None
    name: str | None
    standard: bool
    note: str = ""

    def describe(self) -> dict:
        """The JSON-ready report entry (everything but the network)."""
        return {"name": self.name, "standard": self.standard, "note": self.note}


def load_factory(spec: str) -> Callable:
    """Import the object named by `spec`, written `"package.module:attribute"` (the attribute may be dotted)."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:factory', got {spec!r}")
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} names a {type(target).__name__}, not a callable factory")
    return target


def user_supplied(network: Callable, spec: str, metric: str) -> MetricNetwork:
    """A network built from the user's `spec`, labelled non-standard in the report."""
    return MetricNetwork(
        network=network,
        name=spec,
        standard=False,
        note=f"non-standard {metric}: computed with the user-supplied network {spec}, not comparable to published"
        " numbers",
    )
