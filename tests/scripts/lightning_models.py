"""Tiny LightningModules and data for the Float8Training tests (CPU, a few steps each)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

IN, HIDDEN, OUT, HEAD = 32, 64, 32, 16


class TinyMLP(L.LightningModule):
    """``lm_head(net(x))`` with ``net = Linear(32,64) → ReLU → Linear(64,32)`` and ``lm_head = Linear(32,16)``.

    Args:
        build: where the layers are built: ``"init"``, ``"setup"`` or ``"configure_model"``.
        optimizer: ``"adam"`` or ``"sgd"``.
        blowup: ``(global_step, factor)``: multiply the input by ``factor`` on that step.
        scale_by_rank: multiply the input by ``1 + global_rank`` (ranks see different amax).
    """

    def __init__(self, build: str = "init", optimizer: str = "adam", lr: float = 1e-3,
                 blowup: tuple[int, float] | None = None, scale_by_rank: bool = False) -> None:
        super().__init__()
        self.build_in = build
        self.optimizer_name = optimizer
        self.lr = lr
        self.blowup = blowup
        self.scale_by_rank = scale_by_rank
        self.net: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        self.losses: list[torch.Tensor] = []  # one per micro-batch, in order
        self.input_amax: dict[int, float] = {}  # global_step -> max |input| over its micro-batches
        if build == "init":
            self._build()

    def _build(self) -> None:
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
        self.lm_head = nn.Linear(OUT, HEAD)

    def setup(self, stage: str) -> None:
        if self.build_in == "setup" and self.net is None:
            self._build()

    def configure_model(self) -> None:
        if self.build_in == "configure_model" and self.net is None:
            self._build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.net(x))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.blowup is not None and self.global_step == self.blowup[0]:
            x = x * self.blowup[1]
        if self.scale_by_rank:
            x = x * (1 + self.global_rank)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._input(x)
        prev = self.input_amax.get(self.global_step, 0.0)
        self.input_amax[self.global_step] = max(prev, float(x.abs().max()))
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.detach().clone())
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoEligible(L.LightningModule):
    """Only a 10→3 linear: nothing fp8 can convert."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.fc(x[:, :10]), y[:, :3])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n_batches: int = 4, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    """Deterministic (x, y) batches: x ``[batch, 32]``, y ``[batch, 16]``; no shuffling."""
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch_size
    ds = torch.utils.data.TensorDataset(torch.randn(n, IN, generator=g), torch.randn(n, HEAD, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


class ManualMLP(TinyMLP):
    """TinyMLP with manual optimization: steps its optimizer every ``every`` batches."""

    def __init__(self, every: int = 1, raw: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.every = every
        self.raw = raw  # step the raw torch optimizer (bypasses Lightning's hooks)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.detach().clone())
        self.manual_backward(loss)
        if (batch_idx + 1) % self.every == 0:
            opt = self.optimizers()
            (opt.optimizer if self.raw else opt).step()
            opt.zero_grad()
        return loss
