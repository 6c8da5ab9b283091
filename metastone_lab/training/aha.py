"""Aha-moment onset detection.

Definition (ours; the paper gives none): evaluations happen every
``eval_every`` steps on a FIXED held-out set. The *aha onset* is the step of
the first evaluation at which the held-out trajectory AUROC is >= ``threshold``
(default 0.8) **and** the AUROC stays >= ``threshold`` for the following
evaluations, ``patience`` evaluations in a row in total (default 2: the onset
evaluation and the next one). The onset is therefore known only ``patience-1``
evaluations after it happened; it is reported once, as the step of the first
evaluation of the qualifying run. A NaN AUROC (one class empty) breaks a run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class AhaDetector:
    threshold: float = 0.8
    patience: int = 2
    history: list[tuple[int, float]] = field(default_factory=list)
    onset: int | None = None

    def update(self, step: int, auroc: float) -> int | None:
        """Record one evaluation; return the onset step the first time it is detected,
        else None (also None on every later call once it has been reported)."""
        self.history.append((int(step), float(auroc)))
        if self.onset is not None:
            return None
        tail = self.history[-self.patience:]
        if len(tail) == self.patience and all(
                not math.isnan(a) and a >= self.threshold for _, a in tail):
            self.onset = tail[0][0]
            return self.onset
        return None

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "patience": self.patience,
                "history": [list(h) for h in self.history], "onset": self.onset}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(a)) for s, a in state.get("history", [])]
        self.onset = state.get("onset")
