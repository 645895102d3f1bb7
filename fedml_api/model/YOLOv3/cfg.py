"""Reading Darknet ``.cfg`` network definitions.

A ``.cfg`` file is a list of sections. Each starts with ``[type]`` on its own line and is
followed by ``key=value`` lines; ``#`` and ``;`` start comments. The first section is
``[net]`` (or ``[network]``): input size and training settings. Every later section is one
layer, numbered from 0 in file order; ``[route]`` and ``[shortcut]`` refer to earlier
layers by that number (negative numbers count back from the current layer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

PathLike = Union[str, os.PathLike]

#: Directory of the ``.cfg`` files shipped with this package.
CFG_DIR = Path(__file__).resolve().parent / "cfg"

_NET_SECTIONS = ("net", "network")


@dataclass
class CfgSection:
    """One ``[type]`` section of a ``.cfg`` file.

    Attributes:
        type: The name between the brackets, lower-cased (``"convolutional"``, ``"yolo"``...).
        options: ``key -> value`` as written (values are strings).
        where: ``"<file>:<line>"`` of the section header, for error messages.
    """

    type: str
    where: str
    options: Dict[str, str] = field(default_factory=dict)

    def _raw(self, key: str, default: Optional[object]) -> Optional[str]:
        if key in self.options:
            return self.options[key]
        if default is None:
            raise ValueError(f"{self.where} [{self.type}]: missing required option {key!r}")
        return None

    def get_int(self, key: str, default: Optional[int] = None) -> int:
        """The option as an int; ``default`` when absent (an error if there is none)."""
        raw = self._raw(key, default)
        if raw is None:
            return int(default)  # type: ignore[arg-type]
        try:
            return int(raw)
        except ValueError:
            raise ValueError(
                f"{self.where} [{self.type}]: {key}={raw!r} is not an integer"
            ) from None

    def get_str(self, key: str, default: Optional[str] = None) -> str:
        """The option as written; ``default`` when absent (an error if there is none)."""
        raw = self._raw(key, default)
        return str(default) if raw is None else raw

    def get_ints(self, key: str) -> List[int]:
        """A required comma-separated list of integers, e.g. ``layers=-1, 61``."""
        raw = self.get_str(key)
        try:
            return [int(item) for item in raw.split(",") if item.strip()]
        except ValueError:
            raise ValueError(
                f"{self.where} [{self.type}]: {key}={raw!r} is not a comma-separated "
                "list of integers"
            ) from None


def resolve_cfg_path(model_def: PathLike) -> Path:
    """Find a model definition: an existing path, else a file shipped in :data:`CFG_DIR`.

    ``"yolov3-tiny.cfg"`` and ``"yolov3-tiny"`` both name the shipped file, so commands do
    not depend on the current directory or on where the project is installed.
    """
    path = Path(model_def)
    if path.is_file():
        return path
    for candidate in (CFG_DIR / path.name, CFG_DIR / f"{path.name}.cfg"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in CFG_DIR.glob("*.cfg")))
    raise FileNotFoundError(
        f"model definition {str(model_def)!r} not found: expected a Darknet .cfg file path "
        f"or the name of a shipped one ({shipped})"
    )


def parse_cfg(path: PathLike) -> List[CfgSection]:
    """Parse a Darknet ``.cfg`` file into its sections, ``[net]`` first.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is malformed (a line outside any section, a line without
            ``=``, a repeated key, no layers, or a first section other than ``[net]``).
    """
    path = Path(path)
    sections: List[CfgSection] = []
    with open(path, encoding="utf-8") as file:
        for line_no, raw_line in enumerate(file, start=1):
            line = raw_line.split("#", 1)[0].split(";", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{line_no}"
            if line.startswith("["):
                if not line.endswith("]") or len(line) < 3:
                    raise ValueError(f"{where}: malformed section header {line!r}")
                sections.append(CfgSection(type=line[1:-1].strip().lower(), where=where))
                continue
            if not sections:
                raise ValueError(f"{where}: {line!r} appears before the first [section]")
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"{where}: expected key=value, got {line!r}")
            current = sections[-1]
            if key in current.options:
                raise ValueError(f"{where}: option {key!r} repeated in [{current.type}]")
            current.options[key] = value.strip()
    if not sections or sections[0].type not in _NET_SECTIONS:
        raise ValueError(f"{path}: the first section must be [net]")
    if len(sections) < 2:
        raise ValueError(f"{path}: defines no layers after [net]")
    return sections
