"""A Lightning run killed part-way (attempt 0) resumes from its last epoch checkpoint (attempt 1).

Needs ``pip install 'checkpointio[lightning]'``. Storage: ``CHECKPOINTIO_STORAGE`` or the embedded
local folder.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

from checkpointio import TaskEnvironment, ctx
from checkpointio.lightning import CheckpointioCallback

env = TaskEnvironment("examples")


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DieOnce(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if ctx().attempt == 0 and trainer.global_step == 15:
            raise RuntimeError("simulated node failure at step 15")


@env.task(retries=2)
def train() -> int:
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    saver = CheckpointioCallback(keep_last=2)  # saves ctx().checkpoint every epoch, in the background
    trainer = L.Trainer(
        max_epochs=4, callbacks=[saver, DieOnce()], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    print(f"attempt {ctx().attempt} starts from {saver.ckpt_path}")
    trainer.fit(Tiny(), data, ckpt_path=saver.ckpt_path)
    return int(trainer.global_step)


if __name__ == "__main__":
    print(f"finished after {train()} steps")
