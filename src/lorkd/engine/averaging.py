"""An exponential moving average of a model's weights (``FitConfig.ema``), as a handler.

After every optimiser step the average moves towards the trained weights::

    avg = d_t * avg + (1 - d_t) * w,    d_t = min(decay, (1 + n) / (10 + n))

with ``n`` the number of updates so far (the warm-up keeps the first averages close to the
trained weights). Floating-point buffers (BatchNorm running statistics) are averaged the same way;
integer buffers (``num_batches_tracked``) are copied.

With an average, the loop validates the *averaged* weights, and ``best.pt`` holds them; the
training weights go on training and ``latest.pt`` keeps both (the average under
``handlers["ema"]``), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorkd.errors import ConfigError

from .handlers import Handler

if TYPE_CHECKING:  # annotations only: loop imports handlers
    from .loop import TrainingLoop

__all__ = ["WeightAverage"]


class WeightAverage(Handler):
    """Keeps ``module``, a frozen copy of ``model`` holding the moving average of its weights.

    Args:
        model: the plain (not DDP-wrapped) model being trained.
        decay: the average's decay in ``(0, 1)``, e.g. 0.999.

    Raises:
        ConfigError: ``decay`` outside ``(0, 1)``.
    """

    state_key = "ema"

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema: the decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.model = model
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model's current weights."""
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for avg, w in zip(self._tensors(self.module), self._tensors(self.model)):
            if avg.is_floating_point():
                avg.lerp_(w.detach(), 1.0 - d)
            else:
                avg.copy_(w)
        self.updates += 1

    def started(self, loop: TrainingLoop) -> None:
        device = next(iter(self.model.parameters())).device
        self.module.to(device)
        loop.averaged = self.module

    def iteration_completed(self, loop: TrainingLoop) -> None:
        self.update()

    def completed(self, loop: TrainingLoop) -> None:
        if loop.cfg.select_metric is None:  # no best epoch kept: the model ends as its average
            self.model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
