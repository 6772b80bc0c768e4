"""Collectives with autograd for the distributed contrastive losses (torch.distributed).

mmfast does not import `torch.distributed.nn`: its functions take `group=group.WORLD` as a default
argument, so when that module is first imported after `init_process_group` (as when a user imports
mmfast inside a worker) the default group is bound into those defaults for good. destroy_process_group
then cannot free it: gloo's threads and rank 0's TCPStore server live on until interpreter shutdown,
where their destruction order is arbitrary and sometimes aborts the process ("terminate called
without an active exception")."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """Every rank's `[n, ...]` tensor concatenated along dim 0; the gradient of each rank's rows is
    the sum over ranks of the gradient that reached those rows."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # An all-reduce on every backend (tested over gloo); a reduce-scatter would move less data on NCCL.
        rows = grad.shape[0] // dist.get_world_size()
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        rank = dist.get_rank()  # this process's rows in the gathered order
        return total[rank * rows:(rank + 1) * rows]


def all_gather_rows(tensor: torch.Tensor, rank: int, world_size: int, *, with_grad: bool,
                    keep_local_grad: bool) -> torch.Tensor:
    """Concatenates every rank's `tensor` along dim 0 (the same shape on every rank).

    with_grad: gradients flow back to every rank's rows (summed over ranks).
    keep_local_grad (without with_grad): this rank's own rows stay connected to `tensor`,
    the others are constants. Both follow open_clip's `gather_features`.
    """
    if with_grad:
        return _GatherRows.apply(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    if keep_local_grad:
        gathered[rank] = tensor
    return torch.cat(gathered, dim=0)


def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    requests = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, tensor.contiguous(), send_to),
        dist.P2POp(dist.irecv, received, receive_from),
    ])
    for request in requests:
        request.wait()
    return received


class NeighbourExchange(torch.autograd.Function):
    """Sends `tensor` to one rank and receives a tensor of the same shape from another;
    the gradient travels the opposite way."""

    @staticmethod
    def forward(ctx, tensor, send_to: int, receive_from: int):
        ctx.send_to, ctx.receive_from = send_to, receive_from
        return _exchange(tensor, send_to, receive_from)

    @staticmethod
    def backward(ctx, grad):
        return NeighbourExchange.apply(grad.contiguous(), ctx.receive_from, ctx.send_to), None, None


def ring_chunks(tensor: torch.Tensor, rank: int, world_size: int, *, bidirectional: bool):
    """Yields every other rank's `tensor` once, passed around the ring with gradients.

    One direction takes world_size - 1 steps; both directions take about half as many,
    each step receiving from the left and from the right neighbour.
    """
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    from_left = from_right = tensor
    remaining = world_size - 1
    while remaining > 0:
        from_left = NeighbourExchange.apply(from_left, right, left)
        yield from_left
        remaining -= 1
        if bidirectional and remaining > 0:
            from_right = NeighbourExchange.apply(from_right, left, right)
            yield from_right
            remaining -= 1
