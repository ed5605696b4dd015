"""Finished rows of a long bench kept on disk, so that an interrupted run continues (``--resume``).

A bench whose rows are independent of each other (each row: one quantization and one evaluation)
writes every finished row to ``<out>/.<name>.rows.json`` beside its run folder, with the settings
that shape the rows. ``--resume`` takes those rows and computes only the missing ones; it refuses
when a setting differs (the rows would mix two runs). Without ``--resume`` an existing file is
refused too, so that hours of finished rows are never dropped silently. The file goes once the
run folder is complete. Rows are deterministic for the same settings on the same machine and
thread count (both are in the settings), so a resumed run writes what an uninterrupted one does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from yoloq.errors import InputError
from yoloq.io import atomic_write_text, flat_keys, to_json


def checkpoint_path(final: Path) -> Path:
    """Beside the run folder (not inside its staging folder, which an interruption removes)."""
    return final.parent / f".{final.name}.rows.json"


def settings_diff(saved: dict, now: dict) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs (either side missing included)."""
    old, new = flat_keys(saved), flat_keys(now)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class RowCheckpoint:
    """The finished rows of one run, keyed by row label, under ``settings`` (JSON-normalised so that
    what is read back compares equal to what was written)."""

    def __init__(self, final: Path, settings: dict, *, resume: bool):
        self.path = checkpoint_path(Path(final))
        self.settings = json.loads(to_json(settings))
        self.rows: dict[str, dict] = self._load() if resume else {}
        if not resume and self.path.exists():
            raise InputError(f"{self.path}: an interrupted run of {Path(final).name} left "
                             f"{len(self._read().get('rows', []))} finished row(s); --resume continues it, "
                             f"or delete the file (or choose another --name) to start over")

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{self.path}: unreadable row checkpoint ({err}); delete it to start over") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise InputError(f"{self.path}: not a row checkpoint (expected 'settings' and a 'rows' list); "
                             f"delete it to start over")
        return data

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = self._read()
        diff = settings_diff(data.get("settings") or {}, self.settings)
        if diff:
            raise InputError(f"{self.path}: --resume with other settings than the interrupted run: "
                             f"{'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. Resume with the "
                             f"original settings, or delete the file to start over")
        return {row["label"]: row["row"] for row in data["rows"]}

    def get(self, label: str) -> Optional[dict]:
        return self.rows.get(label)

    def add(self, label: str, row: dict) -> dict:
        """Keep ``row`` (written at once, atomically) and return it as it reads back."""
        self.rows[label] = json.loads(to_json(row))
        atomic_write_text(self.path, to_json({"settings": self.settings,
                                              "rows": [{"label": k, "row": v} for k, v in self.rows.items()]}))
        return self.rows[label]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
