"""Catalogues of feature changes in public repositories: pinned TOML lists that history mode measures.

`peers.toml` is the shipped one (AXLearn, MaxText, TorchTitan, Megatron-LM, Praxis). Its format::

    [[repository]]
    name = "torchtitan"                             # how changes refer to it
    url = "https://github.com/pytorch/torchtitan"
    models = ["torchtitan/models/*/**"]             # globs of its model definitions (`history.model_unit`)

    [[change]]
    repository = "torchtitan"
    feature = "rope"
    commits = ["0123abcd..."]                       # each a commit (against its first parent) or a range A..B
    models = ["llama3"]                             # the models/variants the change gave the feature to
    rationale = "why this change is the feature's integration, in one line"

`paper.toml` holds what the AXLearn paper reports, with where each number comes from. A malformed file is refused
with one line naming the file, the entry and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("peers.toml")
PAPER = Path(__file__).with_name("paper.toml")


class CatalogueError(ValueError):
    """A catalogue file that is missing or malformed."""


@dataclass(frozen=True)
class Repo:
    name: str
    url: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    number: int  # 1-based position among the file's changes
    repository: str
    feature: str
    commits: tuple[str, ...]
    models: tuple[str, ...]
    rationale: str


@dataclass(frozen=True)
class Catalogue:
    path: str
    sha256: str
    repositories: dict[str, Repo]
    changes: tuple[Change, ...]

    @property
    def features(self) -> list[str]:
        return list(dict.fromkeys(c.feature for c in self.changes))


@dataclass(frozen=True)
class PaperRow:
    """One number the AXLearn paper reports, with where it was read."""

    system: str
    feature: str
    loc: str
    growth: str
    setting: str
    source: str


_SCHEMA: dict[str, dict[str, type]] = {
    "repository": {"name": str, "url": str, "models": list},
    "change": {"repository": str, "feature": str, "commits": list, "models": list, "rationale": str},
    "row": {"system": str, "feature": str, "loc": str, "growth": str, "setting": str, "source": str},
}
_OPTIONAL = {"models"}


def _read(path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"catalogue {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        return tomllib.loads(raw.decode()), hashlib.sha256(raw).hexdigest()
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CatalogueError(f"{path}: not valid TOML: {e}") from None


def _entries(data: dict[str, Any], table: str, path: str | Path) -> list[dict[str, Any]]:
    """The `[[table]]` entries, each checked against the schema (keys and types)."""
    schema = _SCHEMA[table]
    entries = data.get(table, [])
    if not isinstance(entries, list) or not entries:
        raise CatalogueError(f"{path}: no [[{table}]] entries")
    for k, entry in enumerate(entries, start=1):
        where = f"{path}: {table} #{k}"
        for key in entry:
            if key not in schema:
                close = difflib.get_close_matches(key, list(schema), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (keys: {', '.join(schema)})"
                raise CatalogueError(f"{where}: unknown key {key!r}{hint}")
        for key, kind in schema.items():
            if key not in entry:
                if key in _OPTIONAL:
                    continue
                raise CatalogueError(f"{where}: missing key {key!r}")
            value = entry[key]
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
                raise CatalogueError(f"{where}: {key!r} must be a {'list of strings' if kind is list else 'string'}")
            if kind is str and not value.strip():
                raise CatalogueError(f"{where}: {key!r} is empty")
    return entries


def load(path: str | Path = SHIPPED) -> Catalogue:
    """Reads and checks a catalogue; raises CatalogueError with one line naming the entry and the fix."""
    data, digest = _read(path)
    repositories = {}
    for entry in _entries(data, "repository", path):
        if entry["name"] in repositories:
            raise CatalogueError(f"{path}: repository {entry['name']!r} is defined twice")
        repositories[entry["name"]] = Repo(entry["name"], entry["url"], tuple(entry.get("models", ())))
    changes = []
    for k, entry in enumerate(_entries(data, "change", path), start=1):
        if entry["repository"] not in repositories:
            known = ", ".join(repositories)
            raise CatalogueError(f"{path}: change #{k}: unknown repository {entry['repository']!r} (known: {known})")
        if not entry["commits"]:
            raise CatalogueError(f"{path}: change #{k}: 'commits' is empty (give a commit or a range A..B)")
        changes.append(
            Change(
                k,
                entry["repository"],
                entry["feature"],
                tuple(entry["commits"]),
                tuple(entry.get("models", ())),
                entry["rationale"],
            )
        )
    return Catalogue(str(path), digest, repositories, tuple(changes))


def load_paper(path: str | Path = PAPER) -> list[PaperRow]:
    """The paper's reported numbers (`[[row]]` entries of system, feature, loc, growth, setting, source)."""
    data, _ = _read(path)
    return [PaperRow(**entry) for entry in _entries(data, "row", path)]
