"""Rank-0 metric logging to TensorBoard event files, `metrics.jsonl` and a console line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricLogger:
    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote past its last checkpoint
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to `step`: a resumed run rewrites what came after its checkpoint."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(self.path)

    def log(self, split: str, step: int, values: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": round(time.time(), 3)}
        record.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.writer.add_scalar(f"{split}/{k}", v, step)
        if console:
            shown = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            print(f"[{split}] step {step} | {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
