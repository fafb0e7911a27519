"""What the Lightning tests train, in one process (``test_lightning``) or sharded over two ranks
(``test_dcp_lightning``): a small regression model and its data, the same weights and batches
every run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch


class Tiny(L.LightningModule):
    """Two linear layers, seeded: every run starts from the same weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def loader() -> Any:
    """24 samples of ``y = sum(x)`` in batches of 4, in the same order every run."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
