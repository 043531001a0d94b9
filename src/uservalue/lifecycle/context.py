"""What the CLI hands every lifecycle stage: the project root, the validated params, and MLflow
configured once (on first use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from uservalue.config import Params


@dataclass
class StageContext:
    root: Path
    params: Params
    _experiment_id: str | None = field(default=None, init=False, repr=False)

    def path(self, path: str | Path) -> Path:
        """A path of the project (relative paths are the root's)."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def tracking(self) -> str:
        """Point MLflow at this project's store (once); the experiment id."""
        if self._experiment_id is None:
            from uservalue.lifecycle import tracking

            self._experiment_id = tracking.configure(self.params.tracking, self.root)
        return self._experiment_id
