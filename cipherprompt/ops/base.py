"""The interface shared by every non-linear operator.

An operator is a small stateless class. Each one states its formula, the input range it was
fitted or checked on, its maximum absolute error there against the exact function, and the
secure primitives it costs under CHEETAH. Tests hold each operator to its stated bound.
"""

from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import ClassVar


class Operator(ABC):
    """Base of all operator kinds; subclasses are final and registered by ``name``."""

    kind: ClassVar[str]
    name: ClassVar[str]
    formula: ClassVar[str]
    # Interval of inputs on which max_error was measured; None where the operator is exact.
    fitted_range: ClassVar[tuple[float, float] | None] = None
    # Maximum absolute error against the exact function on fitted_range, in float32.
    max_error: ClassVar[float] = 0.0
    # Secure primitives one element costs under CHEETAH, as a short phrase.
    primitives: ClassVar[str]

    @classmethod
    def cheetah_cost(cls, path: Path | None = None) -> dict:
        """Look up this operator's cost under CHEETAH, measured by the operator benchmark.

        Returns the entry of ``cipherprompt/ops/operator-costs.json`` (or ``path``):
        ``per_element`` and ``fixed`` costs (seconds, bytes_sent, bytes_received, bytes,
        messages) fitted on two input sizes, the runs behind them and the input range used.
        Raises FileNotFoundError or KeyError naming the benchmark command when it is missing.
        """
        from cipherprompt.ops.costs import measured_cost

        return measured_cost(cls.kind, cls.name, path)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "formula": self.formula,
            "fitted_range": self.fitted_range,
            "max_error": self.max_error,
            "primitives": self.primitives,
        }


def make_registry(base: type[Operator], *classes: type[Operator]) -> dict[str, type[Operator]]:
    registry = {}
    for cls in classes:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} is not a {base.__name__}")
        if cls.name in registry:
            raise ValueError(f"two {base.kind} operators are named {cls.name!r}")
        registry[cls.name] = cls
    return registry


def lookup(registry: dict[str, type[Operator]], kind: str, name: str) -> Operator:
    """Instantiate the operator ``name`` of ``kind``, or raise listing the valid names."""
    if name not in registry:
        raise ValueError(
            f"unknown {kind} operator {name!r}; valid choices: {', '.join(sorted(registry))}"
        )
    return registry[name]()
