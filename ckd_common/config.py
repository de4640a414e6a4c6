"""Typed command configs: validated up front (every problem in one error), printed at start and
saved as JSON next to what the command writes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class ConfigError(ValueError):
    """All problems of a config at once, one per line."""

    def __init__(self, problems: list[str], what: str = "config"):
        self.problems = list(problems)
        super().__init__(f"invalid {what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in problems))


class CommandConfig:
    """Mixin for dataclass configs: subclasses implement ``problems()``."""

    def problems(self) -> list[str]:
        return []

    def validate(self):
        probs = self.problems()
        if probs:
            raise ConfigError(probs, type(self).__name__)
        return self

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        d = self.to_dict()
        width = max(map(len, d)) if d else 0
        return f"{type(self).__name__}:\n" + "\n".join(f"  {k:<{width}} = {v}" for k, v in d.items())

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps({"config": type(self).__name__, **self.to_dict()}, indent=2, default=str))
        tmp.replace(p)


def path_problems(**paths: tuple[Path | str | None, str]) -> list[str]:
    """Problems for paths that must exist: name=(path, 'file'|'dir')."""
    out = []
    for name, (p, kind) in paths.items():
        if p is None:
            out.append(f"{name} is required")
            continue
        p = Path(p)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            out.append(f"{name}: {kind} {p} does not exist")
    return out
