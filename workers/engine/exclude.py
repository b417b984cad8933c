"""`exclude`, the job option that keeps layers in float: one matcher for every backend path."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Exclusions"]


class Exclusions:
    """Matches layers against config.exclude: a layer path, its module name, a path prefix or a type name.

    Example:
        >>> excluded = Exclusions(("features.0", "Linear"))
        >>> excluded("features.0.conv", type_name="Conv2d"), excluded.unused_warnings()
        (True, ["exclude entry 'Linear' matched no layer"])
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self.used: set[str] = set()

    def __call__(self, *names: str, type_name: str) -> bool:
        for entry in self.entries:
            if entry == type_name or any(n and (n == entry or n.startswith(entry + ".")) for n in names):
                self.used.add(entry)
                return True
        return False

    def unused_warnings(self) -> list[str]:
        return [f"exclude entry '{e}' matched no layer" for e in self.entries if e not in self.used]
