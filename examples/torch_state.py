"""Plain PyTorch: model + optimizer + step saved each epoch in the background, restored on retry.

Needs ``pip install 'checkpointio[torch]'``.
"""

from __future__ import annotations

import torch

from checkpointio import TaskEnvironment, ctx
from checkpointio.torch import load_state_sync, save_state_sync

env = TaskEnvironment("examples")


@env.task(retries=2)
def train(epochs: int = 5) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = load_state_sync(ctx().checkpoint, model, optimizer)
    start = state["step"] if state else 0
    print(f"attempt {ctx().attempt} resumed at epoch {start}")
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    loss = torch.tensor(0.0)
    for epoch in range(start, epochs):
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        save_state_sync(ctx().checkpoint, model, optimizer, step=epoch + 1, wait=False)  # training goes on
        if ctx().attempt == 0 and epoch == 2:
            raise RuntimeError("simulated failure after epoch 3")
    return float(loss)


if __name__ == "__main__":
    print(f"finished: loss {train():.4f}")
