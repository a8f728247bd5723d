"""Functions run on every rank of a LocalWorld for the PIIP branch-parallel tests."""

import torch.distributed as dist

from parallelism.branch import batch_slice
from parallelism.dims import BranchLayout
from workloads.piip.model import PIIP, make_pyramid
from workloads.piip.parallel import classification_loss, segmentation_loss


def branch_parallel_step(cfg, state, images, labels, ranks_per_branch, masks=None):
    layout = BranchLayout(ranks_per_branch=tuple(ranks_per_branch), world_size=dist.get_world_size())
    groups = layout.build()
    model = PIIP(cfg)
    model.load_state_dict(state)
    lo, hi = batch_slice(layout, groups.branch, groups.rank, images.shape[0])
    pyramid = make_pyramid(images[lo:hi], cfg)
    if masks is None:
        loss = classification_loss(model, pyramid[groups.branch], labels[lo:hi], groups, images.shape[0])
    else:
        loss = segmentation_loss(model, pyramid[groups.branch], masks[lo:hi], groups, images.shape[0])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return groups.branch, float(total), _group_grads(model, groups)


def branch_parallel_engine_step(cfg, state, images, labels, ranks_per_branch):
    """One AdamW step with gradients reduced per branch group and clipped by the global norm."""
    from workloads.engine import TrainingConfig, build_engine
    from workloads.piip.parallel import owned_parameters

    layout = BranchLayout(ranks_per_branch=tuple(ranks_per_branch), world_size=dist.get_world_size())
    groups = layout.build()
    model = PIIP(cfg)
    model.load_state_dict(state)
    owned = owned_parameters(model, groups)
    engine = build_engine(model, TrainingConfig(lr=1e-2, eps=1e-3, grad_clip=0.5, steps=10, sharding="none"), owned=owned)
    lo, hi = batch_slice(layout, groups.branch, groups.rank, images.shape[0])
    loss = classification_loss(model, make_pyramid(images[lo:hi], cfg)[groups.branch], labels[lo:hi], groups,
                               images.shape[0])
    engine.backward(loss)
    engine.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in owned}
    return engine.last_grad_norm, params if groups.index_in_branch == 0 else {}


def detection_step(cfg, det, state, images, targets, ranks_per_branch):
    """Mask R-CNN's loss and gradients with the branches on their groups (torchvision's
    heads on branch 0's ranks): (branch, summed loss, terms, this group's gradients)."""
    import torch

    from workloads.piip.detection import PIIPDetector
    from workloads.piip.parallel import detection_loss

    layout = BranchLayout(ranks_per_branch=tuple(ranks_per_branch), world_size=dist.get_world_size())
    groups = layout.build()
    model = PIIPDetector(cfg, det).to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    model.train()
    lo, hi = batch_slice(layout, groups.branch, groups.rank, len(images))
    torch.manual_seed(0)  # the same draws as the single process: RPN and RoI sampling
    loss, terms = detection_loss(model, images[lo:hi], targets[lo:hi], groups, len(images))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return groups.branch, total.item(), {k: v.item() for k, v in terms.items()}, _group_grads(model, groups)


def _group_grads(model, groups):
    """Gradients reduced within the branch group only (its ranks hold the same branch),
    from the group's first rank; {} from the others."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=groups.group)
            grads[name] = p.grad
    return grads if groups.index_in_branch == 0 else {}
