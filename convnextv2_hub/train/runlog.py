"""The run's log: rank-0 console lines, ``log.jsonl`` (trimmed on resume to what an uninterrupted run
would have written) and optional TensorBoard scalars.

Nothing is written to disk before the first ``record``: a run that fails while checking its data and
model leaves no log file or TensorBoard folder behind. ``log.jsonl`` is strict JSON: a NaN or infinite
value is written as null and named in the line's ``non_finite_as_null``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..files import atomic_write, json_text
from .distributed import DistEnv


class Logger:
    """Rank-0 console lines, ``log.jsonl`` and optional TensorBoard."""

    def __init__(self, out: Optional[Path], env: DistEnv, use_tensorboard: bool) -> None:
        self.active = env.is_main
        self.path = out / "log.jsonl" if (out is not None and self.active) else None
        self.tb = None
        # Opened at the first record: SummaryWriter creates its folder at once.
        self._tb_dir = out / "tensorboard" if (self.active and out is not None and use_tensorboard) else None

    def info(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def _open_tensorboard(self) -> None:
        tb_dir, self._tb_dir = self._tb_dir, None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(tb_dir))
        except ImportError:
            self.tb = None

    def record(self, entry: Dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json_text(entry) + "\n")
        if self._tb_dir is not None:
            self._open_tensorboard()
        if self.tb is not None:
            step = entry.get("global_step", 0)
            for k, v in _flatten(entry).items():
                if isinstance(v, (int, float)) and k not in ("global_step", "epoch", "micro"):
                    self.tb.add_scalar(f"{entry['type']}/{k}", v, step)

    def truncate_after(self, epoch: int, global_step: int) -> None:
        """On resume: drop lines a killed run wrote after the checkpoint it resumes from, so the
        log is exactly the log of an uninterrupted run."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if e.get("type") == "epoch":
                if e["epoch"] < epoch:
                    kept.append(line)
            elif e.get("global_step", 0) <= global_step:
                kept.append(line)
        data = ("\n".join(kept) + ("\n" if kept else "")).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(data))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
