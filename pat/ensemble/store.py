"""The ensemble directory: ``ensemble.json`` (the manifest) plus one checkpoint per member.

Manifest (see ``docs/file-formats.md``)::

    {"format_version": 1, "pat_version": "0.1.0",
     "arch": {"name": ..., "kwargs": {...}} | null,   # shared architecture, if any
     "num_classes": 10,
     "image_shape": [1, 32, 32] | null,               # (C, H, W) the members take
     "dataset": "digits",                             # = data.dataset, kept for older readers
     "data": {"dataset": "digits", "data_dir": "./data", "val_fraction": 0.1, "seed": 0} | null,
     "parent": {"file": "/abs/or/relative/parent.pt", ...} | null,
     "members": [{"name": "child-0", "file": "child-0.pt", "producer": "split",
                  "status": "split" | "tuned" | "trained", "parent": ..., "recipe": {...},
                  "metrics": {...}}, ...],
     "selection": {"method": ..., "selected": [...], "weights": [...]} | null,
     "config": {...}}

Every reader validates the manifest and names what is wrong. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pat.engine.checkpoint import atomic_write
from pat.errors import PatError

__all__ = ["MANIFEST", "FORMAT_VERSION", "EnsembleDir"]

MANIFEST = "ensemble.json"
FORMAT_VERSION = 1
_STATUSES = {"split", "tuned", "trained"}


@dataclass
class EnsembleDir:
    """An ensemble directory on disk; mutate ``manifest`` then call :meth:`save`."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    # -- creation / loading -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        arch: dict[str, Any] | None,
        num_classes: int | None,
        parent: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        dataset: str | None = None,
        data: dict[str, Any] | None = None,
        image_shape: list[int] | None = None,
        force: bool = False,
        argument: str = "--out",
    ) -> EnsembleDir:
        """Start a new ensemble directory; refuse one that already holds members unless ``force``.

        ``data`` (dataset, data_dir, val_fraction, seed) and ``image_shape`` ((C, H, W)) are what
        every later command reads instead of its own defaults (``pat.cli.options``); ``dataset``
        defaults to ``data["dataset"]``.

        Nothing is written until :meth:`save`; with ``force`` the old manifest is replaced then,
        and old member files are overwritten one by one as the new members are written.
        """
        from pat import __version__

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PatError(f"{argument} {str(path)!r} exists and is not a directory.")
        old = path / MANIFEST
        if old.exists() and not force:
            raise PatError(
                f"{argument} {str(path)!r} already holds an ensemble; pass --force to replace it."
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "pat_version": __version__,
            "arch": arch,
            "num_classes": num_classes,
            "image_shape": None if image_shape is None else [int(v) for v in image_shape],
            "dataset": dataset if dataset is not None else (data or {}).get("dataset"),
            # what every later command uses unless told otherwise
            "data": None if data is None else {k: data.get(k) for k in ("dataset", "data_dir", "val_fraction", "seed")},
            "parent": parent,
            "members": [],
            "selection": None,
            "config": config or {},
        }
        return cls(path, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, *, argument: str = "ENSEMBLE_DIR") -> EnsembleDir:
        """Read and validate ``path/ensemble.json``."""
        path = Path(path)
        if not path.is_dir():
            raise PatError(f"{argument} {str(path)!r} is not a directory.")
        file = path / MANIFEST
        if not file.is_file():
            raise PatError(f"{argument} {str(path)!r} has no {MANIFEST}; is it an ensemble directory?")
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PatError(f"{argument} {str(file)!r} is not valid JSON ({e}).") from None
        ens = cls(path, manifest)
        ens.validate(argument=argument)
        return ens

    def validate(self, *, argument: str = "ENSEMBLE_DIR", check_files: bool = True) -> None:
        """Raise :class:`PatError` naming the first thing wrong with the manifest."""
        m, where = self.manifest, f"{argument} {str(self.path / MANIFEST)!r}"
        if not isinstance(m, dict):
            raise PatError(f"{where}: manifest must be a JSON object.")
        version = m.get("format_version")
        if not isinstance(version, int):
            raise PatError(f"{where}: missing integer 'format_version'.")
        if version > FORMAT_VERSION:
            raise PatError(f"{where}: format_version {version} is newer than this pat reads ({FORMAT_VERSION}).")
        members = m.get("members")
        if not isinstance(members, list):
            raise PatError(f"{where}: 'members' must be a list.")
        names: set[str] = set()
        for i, member in enumerate(members):
            if not isinstance(member, dict) or not isinstance(member.get("name"), str):
                raise PatError(f"{where}: members[{i}] must be an object with a 'name'.")
            if not isinstance(member.get("file"), str):
                raise PatError(f"{where}: member {member['name']!r} has no 'file'.")
            if member["name"] in names:
                raise PatError(f"{where}: member name {member['name']!r} appears twice.")
            names.add(member["name"])
            if member.get("status") not in _STATUSES:
                raise PatError(
                    f"{where}: member {member['name']!r} has status {member.get('status')!r}; "
                    f"expected one of {sorted(_STATUSES)}."
                )
            if check_files and not (self.path / member["file"]).is_file():
                raise PatError(f"{where}: member {member['name']!r} file {member['file']!r} is missing.")
        sel = m.get("selection")
        if sel is not None:
            unknown = [n for n in sel.get("selected", []) if n not in names]
            if unknown:
                raise PatError(f"{where}: selection names unknown members {unknown}.")

    # -- members --------------------------------------------------------------------------
    @property
    def members(self) -> list[dict[str, Any]]:
        return self.manifest["members"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def member(self, name: str) -> dict[str, Any]:
        for m in self.members:
            if m["name"] == name:
                return m
        raise PatError(f"member {name!r} is not in {str(self.path)!r}; members: {[m['name'] for m in self.members]}.")

    def member_path(self, member: dict[str, Any] | str) -> Path:
        if isinstance(member, str):
            member = self.member(member)
        return self.path / member["file"]

    def upsert_member(self, record: dict[str, Any]) -> None:
        """Add ``record`` or replace the member of the same name (then :meth:`save`)."""
        for i, m in enumerate(self.members):
            if m["name"] == record["name"]:
                self.members[i] = record
                return
        self.members.append(record)

    def fingerprint(self) -> list[dict[str, Any]]:
        """Identify the member files as they are now: name, file, size, mtime and inode.

        Cheap (no file is read) and changed by every rewrite: :func:`atomic_write` always
        makes a new inode. Caches of member predictions store it and compare.
        """
        out = []
        for m in self.members:
            st = self.member_path(m).stat()
            out.append({"name": m["name"], "file": m["file"], "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns, "inode": st.st_ino})
        return out

    def calibration_stamp(self) -> list[dict[str, Any]]:
        """Member names, files, sizes and mtimes: what a calibration was fitted for.

        Unlike :meth:`fingerprint` it leaves out inodes, so a copy made with ``cp -p`` keeps
        its calibration while a re-tuned member (a new file) invalidates it.
        """
        return [{k: v for k, v in f.items() if k != "inode"} for f in self.fingerprint()]

    def calibration(self, *, argument: str = "ENSEMBLE_DIR") -> dict[str, Any] | None:
        """The temperatures recorded by ``pat calibrate``, or None if there are none.

        Raises :class:`PatError` when members changed since they were fitted: stale
        temperatures would quietly miscalibrate every number computed with them.
        """
        record = self.manifest.get("calibration")
        if not record:
            return None
        if record.get("stamp") != self.calibration_stamp():
            raise PatError(f"{argument} {str(self.path)!r}: members changed since 'pat calibrate' fitted "
                           "their temperatures; run pat calibrate again (or pass --no-calibration).")
        return record

    def record_selection(
        self, method: str, selected: list[int], weights: list[float], **extra: Any
    ) -> None:
        """Store a selector's result (member indices → names) in the manifest (then :meth:`save`)."""
        if len(selected) != len(weights):
            raise PatError(f"selection has {len(selected)} members but {len(weights)} weights.")
        names = [self.members[i]["name"] for i in selected]
        self.manifest["selection"] = {"method": method, "selected": names,
                                      "weights": [float(w) for w in weights], **extra}

    def selection_indices(self) -> tuple[list[int], list[float] | None] | None:
        """The recorded selection as ``(member indices, weights or None)``; None if there is none."""
        sel = self.manifest.get("selection")
        if not sel:
            return None
        index = {m["name"]: i for i, m in enumerate(self.members)}
        return [index[n] for n in sel["selected"]], sel.get("weights")

    # -- writing ------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the manifest atomically (creating the directory if needed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest, indent=2, sort_keys=False) + "\n"
        atomic_write(self.path / MANIFEST, lambda f: f.write(text.encode()))
