"""mmfast.nn.ClipLoss / SigLipLoss across processes (gloo on CPU) against open_clip's classes
run in the same processes, and against the single-process loss on the global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.processes import assert_process_group_freed, free_port

pytestmark = pytest.mark.distributed
LOCAL_BATCH, DIM = 5, 24


def _global_features(world_size, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(world_size * LOCAL_BATCH, DIM, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def _local_inputs(rank, world_size, with_bias):
    image = _global_features(world_size, 1)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH].clone().requires_grad_()
    text = _global_features(world_size, 2)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH].clone().requires_grad_()
    inputs = [image, text, torch.tensor(9.0, requires_grad=True)]
    if with_bias:
        inputs.append(torch.tensor(-5.0, requires_grad=True))
    return inputs


def _loss_and_grads(loss_module, inputs):
    loss = loss_module(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def _as_global(grads):
    """The ranks' gradients as DDP combines them: feature gradients already hold every rank's
    contribution (the gather's backward sums them); scalar gradients are summed over ranks.
    Divided by world_size, they are the gradients of the global-batch loss."""
    combined = [g.clone() for g in grads]
    for g in combined[2:]:
        dist.all_reduce(g)
    world_size = dist.get_world_size()
    return [g / world_size for g in combined]


def _worker(rank, world_size, port, check):
    # Import before the process group exists: open_clip imports torch.distributed.nn, whose functions
    # bind the default group as a default argument when first imported after init_process_group; the
    # group then outlives destroy_process_group and its threads die at interpreter shutdown, which
    # aborted rank 0 about one run in three.
    import open_clip.loss  # noqa: F401

    import mmfast  # noqa: F401

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        check(rank, world_size)
    finally:
        dist.destroy_process_group()
    assert_process_group_freed()


def _check_clip(rank, world_size):
    import open_clip.loss

    import mmfast
    from mmfast.ops.contrastive import reference

    for backend in ("reference", "triton"):
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                settings = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                world_size=world_size)
                label = f"{backend} {settings}"
                ours = _loss_and_grads(mmfast.nn.ClipLoss(**settings, backend=backend),
                                       _local_inputs(rank, world_size, False))
                theirs = _loss_and_grads(open_clip.loss.ClipLoss(**settings), _local_inputs(rank, world_size, False))
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6, msg=label)
                for mine, expected in zip(ours[1], theirs[1]):
                    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6, msg=label)

                if local_loss and gather_with_grad:
                    # What DDP trains on: the ranks' gradients summed, divided by world_size, are the
                    # gradients of the single-process loss on the global batch.
                    image = _global_features(world_size, 1).requires_grad_()
                    text = _global_features(world_size, 2).requires_grad_()
                    scale = torch.tensor(9.0, requires_grad=True)
                    single = reference.clip_loss(image, text, scale)
                    single_grads = torch.autograd.grad(single, [image, text, scale])
                    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                    expected = [single_grads[0][rows], single_grads[1][rows], single_grads[2]]
                    for mine, exact in zip(_as_global(ours[1]), expected):
                        torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-6, msg=label)
                    mean_loss = ours[0].clone()
                    dist.all_reduce(mean_loss)
                    torch.testing.assert_close(mean_loss / world_size, single.detach(), rtol=1e-5, atol=1e-6)


def _check_siglip(rank, world_size):
    import open_clip.loss

    import mmfast
    from mmfast.ops.contrastive import reference

    image = _global_features(world_size, 1).requires_grad_()
    text = _global_features(world_size, 2).requires_grad_()
    scale, bias = torch.tensor(9.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    single = reference.siglip_loss(image, text, scale, bias)
    single_grads = torch.autograd.grad(single, [image, text, scale, bias])
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    for backend in ("reference", "triton"):
        for dist_impl in ("bidir", "shift", "reduce", "gather"):
            label = f"{backend} {dist_impl}"
            settings = dict(rank=rank, world_size=world_size, dist_impl=dist_impl)
            ours = _loss_and_grads(mmfast.nn.SigLipLoss(**settings, backend=backend),
                                   _local_inputs(rank, world_size, True))
            theirs = _loss_and_grads(open_clip.loss.SigLipLoss(**settings), _local_inputs(rank, world_size, True))
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5, msg=label)
            for mine, expected in zip(ours[1], theirs[1]):
                torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5, msg=label)
            # Each rank divides by its local batch: the mean over ranks is the global loss, and the
            # ranks' gradients, combined as DDP does, are the global gradients.
            total = ours[0].clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / world_size, single.detach(), rtol=1e-5, atol=1e-5, msg=label)
            expected = [single_grads[0][rows], single_grads[1][rows], *single_grads[2:]]
            for mine, exact in zip(_as_global(ours[1]), expected):
                torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-5, msg=label)


def _spawn(check, world_size):
    pytest.importorskip("open_clip")
    mp.spawn(_worker, args=(world_size, free_port(), check), nprocs=world_size, join=True)


def test_clip_loss_two_ranks_match_open_clip_and_global_batch():
    _spawn(_check_clip, 2)


def test_siglip_loss_three_ranks_match_open_clip_and_global_batch():
    """Three ranks so the bidirectional ring uses both of its directions."""
    _spawn(_check_siglip, 3)
