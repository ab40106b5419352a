"""Renaming checkpoint tensor and module names to runtime names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NameMapper:
    """Ordered prefix, substring and suffix renames, applied in that order.

    A rename that maps to ``None`` drops the name (``map`` returns ``None``).
    """

    prefix: dict[str, str | None] = field(default_factory=dict)
    substr: dict[str, str | None] = field(default_factory=dict)
    suffix: dict[str, str | None] = field(default_factory=dict)

    def map(self, name: str) -> str | None:
        for old, new in self.prefix.items():
            if name.startswith(old):
                if new is None:
                    return None
                name = new + name[len(old):]
        for old, new in self.substr.items():
            if old in name:
                if new is None:
                    return None
                name = name.replace(old, new)
        for old, new in self.suffix.items():
            if name.endswith(old):
                if new is None:
                    return None
                name = name[: len(name) - len(old)] + new
        return name

    def map_list(self, names: list[str]) -> list[str]:
        mapped = (self.map(n) for n in names)
        return [n for n in mapped if n is not None]
