"""Where training metrics go: the console, ``RUN/metrics.jsonl``, tensorboard and wandb.

Only global rank 0 writes. ``metrics.jsonl`` has one JSON object per event (``"event"``:
``train``, ``eval``, ``checkpoint``, ``start``, ``end``); it is appended to (a resumed run adds to
it) and flushed after every line, so a pipeline or a test can read it while training runs.
Tensorboard is used when ``torch.utils.tensorboard`` imports (the ``tensorboard`` package);
wandb when it is installed and enabled (``WANDB_MODE=offline`` or ``logging.wandb_mode: offline``
needs no network). Neither is required.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from megatron_btx.config import Config

log = logging.getLogger(__name__)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, resumed_step: int = 0) -> None:
        self.enabled = rank == 0
        self.cfg = cfg
        self.run_dir = run_dir
        self.tb = None
        self.wandb = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(run_dir / "tensorboard"),
                    purge_step=resumed_step + 1 if resumed_step else None,
                )
            except ImportError as e:
                log.warning("tensorboard logging is on but unavailable (%s); skipping it", e)
        if cfg.logging.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    name=cfg.logging.wandb_name or run_dir.name,
                    dir=str(run_dir),
                    config=cfg.to_dict(),
                    mode=cfg.logging.wandb_mode or os.environ.get("WANDB_MODE"),
                    resume="allow",
                    id=_wandb_id(run_dir),
                )
            except ImportError:
                log.warning("logging.wandb is on but wandb is not installed; skipping it")
            except Exception as e:  # a wandb outage must never stop training
                log.warning("wandb could not start (%s); continuing without it", e)

    def event(self, event: str, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        self._jsonl.write(json.dumps(rec, default=_json_default) + "\n")
        scalars = {
            k: v
            for k, v in fields.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if event in ("train", "eval"):
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(f"{event}/{k}", v, step)
            if self.wandb is not None:
                try:
                    self.wandb.log({f"{event}/{k}": v for k, v in scalars.items()}, step=step)
                except Exception as e:  # pragma: no cover
                    log.warning("wandb log failed: %s", e)

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def train_line(
        self, step: int, total: int, m: dict[str, Any], elapsed: float, steps_done: int
    ) -> None:
        if not self.enabled:
            return
        eta = (total - step) * elapsed / max(steps_done, 1)
        parts = [
            f"step {step:>6d}/{total}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.3e}",
            f"grad_norm {m['grad_norm']:.3f}",
        ]
        if "load_balancing_loss" in m:
            parts.append(f"lb_loss {m['load_balancing_loss']:.4f}")
        parts += [f"tok/s {m['tokens_per_s']:.0f}", f"ETA {_fmt_time(eta)}"]
        self.console(" | ".join(parts))

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # pragma: no cover
                pass
            self.wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same curve."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    path.write_text(rid)
    return rid


def _json_default(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def read_metrics(run_dir: str | os.PathLike[str], event: str | None = None) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (optionally one event type), oldest first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill -9
            continue
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out
