"""One interface for training metrics: JSON lines always, TensorBoard event files too when
``tensorboard`` is installed (``pip install rcfd[tensorboard]``).

Each unit of training logs to ``<run_dir>/<stage>/<unit>.jsonl`` (one JSON object per logged
step) and, with TensorBoard, to ``<run_dir>/tensorboard/<stage>/<unit>/`` (open it with
``tensorboard --logdir <run_dir>/tensorboard``). A resumed unit first drops what was logged
after its checkpoint (:meth:`MetricsLogger.start`), in both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rcfd.io.files import read_jsonl, write_text

try:  # optional: TensorBoard event files when the package is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is not installed
    SummaryWriter = None


class MetricsLogger:
    """Writes a unit's metric rows (dicts with a ``"step"``) to its JSONL file and, when
    TensorBoard is installed and ``tensorboard_dir`` is given, as scalars under the row's
    keys. Only numeric, finite values go to TensorBoard."""

    def __init__(self, jsonl: str | Path, tensorboard_dir: str | Path | None = None):
        self.jsonl = Path(jsonl)
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._writer = None

    @property
    def tensorboard(self) -> bool:
        return SummaryWriter is not None and self.tensorboard_dir is not None

    def start(self, step: int) -> None:
        """Keep the rows of steps ``<= step`` (a resumed unit trains the later ones again);
        ``step == 0`` starts an empty log."""
        if self.jsonl.exists():
            keep = [r for r in read_jsonl(self.jsonl) if step and r.get("step", 0) <= step]
            write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in keep))
        if self.tensorboard:
            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step or None)

    def log(self, row: dict) -> None:
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
