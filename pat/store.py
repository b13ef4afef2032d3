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
                  "metrics": {...}, "size": 123456, "sha256": "..."}, ...],
     "selection": {"method": ..., "selected": [...], "weights": [...]} | null,
     "config": {...}}

Every reader validates the manifest and names what is wrong. Writes are atomic.

Member files must lie inside the directory (no absolute names, no ``..``, no symlink out of
it): a manifest is data from anyone, and following it must not read or overwrite a file
elsewhere. Each member record written by pat carries the file's ``size`` and ``sha256``; a
reader checks them, so a member truncated or replaced since pat wrote it is named instead
of evaluated or tuned. Records without them (older manifests) are still read.

Records share a file only as the children of one packed file (``pat split --pack``): each
says ``"packed": {"index": i, "of": M}``, and together they are the file's children in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pat.errors import PatError
from pat.io import atomic_write, file_digest

__all__ = ["MANIFEST", "FORMAT_VERSION", "EnsembleDir"]

MANIFEST = "ensemble.json"
FORMAT_VERSION = 1
_STATUSES = {"split", "tuned", "trained"}
# (path, size, mtime_ns, inode) -> a packed file's child names, read once per version of the file
_PACKED: dict[tuple[str, int, int, int], list[str]] = {}


def _check_packed_entry(member: dict[str, Any], where: str) -> None:
    entry = member["packed"]
    if not (isinstance(entry, dict) and all(type(entry.get(k)) is int for k in ("index", "of"))
            and 0 <= entry["index"] < entry["of"]):
        raise PatError(f"{where}: member {member['name']!r} has 'packed' {entry!r}; expected "
                       '{"index": i, "of": n} with 0 <= i < n.')


def _packed_names(file: Path, where: str) -> list[str]:
    """The children's names a packed file holds (its header read once per version of the file)."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _PACKED:
        from pat.engine.checkpoint import load_checkpoint
        from pat.pack import packed_header

        _PACKED[key] = packed_header(load_checkpoint(file, mmap=True, argument=f"{where}: packed file"),
                                     f"{where}: packed file {file.name!r}")["names"]
    return _PACKED[key]


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

    def validate(self, *, argument: str = "ENSEMBLE_DIR", check_files: bool = True,
                 allow_missing: bool = False) -> None:
        """Raise :class:`PatError` naming the first thing wrong with the manifest.

        Member file names are always checked to stay inside the directory. With
        ``check_files`` each member file must exist (unless ``allow_missing``: a resumable
        producer trains a missing one again) and match its recorded size and sha256.
        """
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
        packed: dict[str, list[dict[str, Any]]] = {}  # packed file -> the records it serves
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
            file = self._inside(member, where)
            if "packed" in member:
                _check_packed_entry(member, where)
                packed.setdefault(member["file"], []).append(member)
            if check_files:
                if not file.is_file():
                    if allow_missing:
                        continue
                    raise PatError(f"{where}: member {member['name']!r} file {member['file']!r} is missing.")
                self._check_stamp(member, file, where)
        self._check_shared_files(members, packed, where, check_files=check_files)
        sel = m.get("selection")
        if sel is not None:
            unknown = [n for n in sel.get("selected", []) if n not in names]
            if unknown:
                raise PatError(f"{where}: selection names unknown members {unknown}.")

    def _check_shared_files(self, members: list[dict[str, Any]], packed: dict[str, list[dict[str, Any]]],
                            where: str, *, check_files: bool) -> None:
        """Records share a file only as the children of one packed file, all of them, in its order."""
        files: dict[str, str] = {}
        for member in members:
            other = files.setdefault(member["file"], member["name"])
            if other != member["name"] and member["file"] not in packed:
                raise PatError(f"{where}: members {other!r} and {member['name']!r} share file "
                               f"{member['file']!r}, which is not a packed file ('packed' records).")
        for name, records in packed.items():
            plain = [m["name"] for m in members if m["file"] == name and "packed" not in m]
            if plain:
                raise PatError(f"{where}: packed file {name!r} is also the file of member {plain[0]!r}, "
                               "which has no 'packed' record.")
            records = sorted(records, key=lambda r: r["packed"]["index"])
            indices, counts = [r["packed"]["index"] for r in records], {r["packed"]["of"] for r in records}
            if counts != {len(records)} or indices != list(range(len(records))):
                raise PatError(f"{where}: packed file {name!r} is listed by {len(records)} members with "
                               f"indices {indices} of {sorted(counts)}; each of its children needs one "
                               "record, indices 0..of-1.")
            file = self.path / name
            if check_files and file.is_file():
                held, listed = _packed_names(file, where), [r["name"] for r in records]
                if held != listed:
                    raise PatError(f"{where}: packed file {name!r} holds {len(held)} children {held} but "
                                   f"the manifest lists {len(listed)} for it, in index order {listed}.")

    # -- members --------------------------------------------------------------------------
    @property
    def members(self) -> list[dict[str, Any]]:
        """The manifest's member records, in manifest order."""
        return self.manifest["members"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def member(self, name: str) -> dict[str, Any]:
        """The manifest record of the member called ``name``; :class:`PatError` if none."""
        for m in self.members:
            if m["name"] == name:
                return m
        raise PatError(f"member {name!r} is not in {str(self.path)!r}; members: {[m['name'] for m in self.members]}.")

    def member_path(self, member: dict[str, Any] | str) -> Path:
        """The member's file, refused (:class:`PatError`) if its name leads out of the directory."""
        if isinstance(member, str):
            member = self.member(member)
        return self._inside(member, f"ENSEMBLE_DIR {str(self.path / MANIFEST)!r}")

    def _inside(self, member: dict[str, Any], where: str) -> Path:
        """``path / member['file']``, which must name a file inside the directory."""
        name = member["file"]
        pure = Path(name)
        if not name or pure.is_absolute() or ".." in pure.parts or pure.name in ("", ".", ".."):
            raise PatError(f"{where}: member {member['name']!r} file {name!r} is not a plain name inside "
                           "the directory (absolute paths and '..' are refused).")
        file = self.path / pure
        if not file.resolve().is_relative_to(self.path.resolve()):
            raise PatError(f"{where}: member {member['name']!r} file {name!r} is a symlink that leads "
                           f"out of the directory (to {str(file.resolve())!r}).")
        return file

    def _check_stamp(self, member: dict[str, Any], file: Path, where: str) -> None:
        """Refuse a member file whose size or sha256 differ from what pat recorded."""
        size, digest = member.get("size"), member.get("sha256")
        if size is None and digest is None:
            return  # written before pat recorded them
        actual = file.stat().st_size
        if (size is not None and actual != size) or (digest is not None and file_digest(file) != digest):
            if self._unrecorded_tuning(member, file):
                return
            what = (f"is {actual} bytes, not the {size} recorded" if size is not None and actual != size
                    else "has other contents (sha256) than recorded")
            raise PatError(f"{where}: member {member['name']!r} file {member['file']!r} {what}: it was "
                           "truncated or replaced after pat wrote it; restore it, or make it again "
                           "(rerun with --force).")

    @staticmethod
    def _unrecorded_tuning(member: dict[str, Any], file: Path) -> bool:
        """A split child whose file the tuner rewrote just before it was stopped (manifest not yet updated).

        ``pat tune`` writes the tuned child (or packed file), then the manifest; the file of the
        same child (same recipe) saying ``tuned`` is that, and the next tune records it.
        """
        if member.get("status") != "split":
            return False
        from pat.engine.checkpoint import load_checkpoint

        try:
            ckpt = load_checkpoint(file, mmap=True)
        except PatError:
            return False
        if ckpt.get("status") != "tuned":
            return False
        if "packed" in member:  # a packed file records its children's recipes in its order
            recipes = ckpt.get("recipes") or []
            index = member["packed"]["index"]
            return ckpt.get("kind") == "packed" and index < len(recipes) and recipes[index] == member.get("recipe")
        return ckpt.get("kind") == "child" and ckpt.get("recipe") == member.get("recipe")

    def stamp(self, record: dict[str, Any], *, file: str | os.PathLike | None = None) -> dict[str, Any]:
        """``record`` with the size and sha256 of its file as it is now (call right after writing it).

        ``file``: where the member's file is now, if not yet at its place in the directory.
        """
        file = Path(file) if file is not None else self.member_path(record)
        return {**record, "size": file.stat().st_size, "sha256": file_digest(file)}

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
