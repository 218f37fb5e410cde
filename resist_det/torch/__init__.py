"""ResIST for plain PyTorch training loops (``torchrun``), without DeepSpeed in the user's code.

A DDP loop adopts it by replacing its ``DistributedDataParallel`` wrap::

    import resist_det.torch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = resist_det.torch.prepare(model, optimizer, resist={"local_steps": 50})
    for x, y in loader:                      # unchanged
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()                     # the local step; every local_steps steps, a sync

See :func:`prepare`.
"""

from .shell import ResISTModule, ResISTOptimizer, prepare

__all__ = ["prepare", "ResISTModule", "ResISTOptimizer"]
