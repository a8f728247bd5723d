"""PIIP with each branch on its own device group (see parallelism/branch.py).

Every rank runs only its branch's blocks, and its side of the interaction units next
to it: unit (k-1, k) as its "b" side, unit (k, k+1) as its "a" side. At each
interaction the two sides exchange projected features (each computes the message for
the other from its own features), then update themselves — the same order and values
as `PIIP.forward_features` in one process. Classification logits (each branch's head on
its CLS token, averaged) are gathered on branch 0's ranks, which compute the loss; the
other ranks' backward is driven through the exchanges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallelism.branch import exchange, routes
from parallelism.dims import BranchGroups

from .model import PIIP


def _tag(stage: int, pair: int, n_pairs: int) -> int:
    return 2 * (stage * (n_pairs + 1) + pair) + 2  # even; exchange's backward uses tag + 1


def forward_branch(model: PIIP, image: torch.Tensor, groups: BranchGroups, batch: int):
    """This rank's branch on its batch slice: (tokens, cls) after all stages."""
    k, n = groups.branch, len(model.cfg.branches)
    layout, rank = groups.layout, groups.rank
    cfgs = model.cfg.branches
    br = model.branches[k]
    x, cls = br.embed(image)
    up = routes(layout, rank, k - 1, batch) if k > 0 else None
    down = routes(layout, rank, k + 1, batch) if k < n - 1 else None
    for s in range(model.cfg.interactions):
        x, cls = br.run_blocks(x, cls, *model.stage_bounds(k, s))
        if n == 1:
            continue
        new = x
        if k > 0:  # unit (k-1, k): I am its b side; I send b_to_a(x), get a_to_b(x_{k-1})
            u = model.units[s][k - 1]
            got = exchange(u.message_for_a(x), (cfgs[k - 1].grid ** 2, cfgs[k].dim), up, _tag(s, k - 1, n - 1))
            new = u.update_b(new, got)
        if k < n - 1:  # unit (k, k+1): I am its a side; I send a_to_b(x), get b_to_a(x_{k+1})
            u = model.units[s][k]
            got = exchange(u.message_for_b(x), (cfgs[k + 1].grid ** 2, cfgs[k].dim), down, _tag(s, k, n - 1))
            new = u.update_a(new, got)
        x = new
    return x, cls


def classification_loss(model: PIIP, image: torch.Tensor, labels: torch.Tensor, groups: BranchGroups,
                         batch: int) -> torch.Tensor:
    """This rank's part of the mean cross-entropy over the whole batch.

    image, labels: this rank's batch slice (image at its branch's resolution). The parts
    of all ranks add up to the loss of the single-process model; call backward on each.
    """
    k, n = groups.branch, len(model.cfg.branches)
    _, cls = forward_branch(model, image, groups, batch)
    logits = model.cls_heads[k](cls[:, 0]) / n  # this branch's share of the averaged logits
    final = _tag(model.cfg.interactions, 0, n - 1)
    if k == 0:
        # A (B, 1) stand-in tied to the graph, so the exchanges have a backward here too.
        stub = cls[:, 0, :1] * 0
        for other in range(1, n):
            logits = logits + exchange(stub, (logits.shape[1],), routes(groups.layout, groups.rank, other, batch),
                                       final + 2 * other)
        return F.cross_entropy(logits, labels, reduction="sum") / batch
    got = exchange(logits, (1,), routes(groups.layout, groups.rank, 0, batch), final + 2 * k)
    return 0.0 * got.sum()  # no loss here: the gradient of `logits` comes back from branch 0


def segmentation_loss(model: PIIP, image: torch.Tensor, masks: torch.Tensor, groups: BranchGroups,
                      batch: int) -> torch.Tensor:
    """This rank's part of the per-pixel cross-entropy (mean over the whole batch).

    Every branch sends its final tokens to branch 0's ranks, where the merge and the
    segmentation head run; masks are this rank's (B_local, H, W) class maps, compared
    at the finest token grid (nearest-neighbour resize).
    """
    feats, stand_in = tokens_on_first(model, *forward_branch(model, image, groups, batch), groups, batch)
    if feats is None:
        return stand_in
    return segmentation_criterion(model, feats, masks) * masks.shape[0] / batch


def detection_loss(model, images: list[torch.Tensor], targets: list[dict] | None, groups: BranchGroups,
                   batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's part of Mask R-CNN's loss (`detection.PIIPDetector`): (loss, its terms).

    images: this rank's slice of the batch, (3, H, W) each; every rank resizes and pads
    them as the detector does and runs its branch at its resolution. targets (boxes,
    labels, masks) are needed on branch 0's ranks only: there the branches' tokens
    meet and torchvision's RPN and RoI heads run on the slice. The terms are weighted by
    the slice's share of the batch, so summed over branch 0's ranks they are the mean
    of their slices' losses (with one rank there: the single-process loss exactly).
    """
    k = groups.branch
    image_list, targets, _ = model.prepare(images, targets if k == 0 else None)
    x, cls = forward_branch(model.piip, model.branch_input(image_list.tensors, k), groups, batch)
    feats, stand_in = tokens_on_first(model.piip, x, cls, groups, batch)
    if feats is None:
        return stand_in, {}
    share = len(images) / batch
    terms = {name: v * share for name, v in model.heads(feats, image_list, targets).items()}
    return sum(terms.values()), terms


def tokens_on_first(model: PIIP, x: torch.Tensor, cls: torch.Tensor, groups: BranchGroups, batch: int):
    """Every branch's final tokens brought to branch 0's ranks: (feats, None) there, and
    (None, a zero loss tied to the send) elsewhere, whose backward receives the
    gradient of the tokens sent."""
    k, n = groups.branch, len(model.cfg.branches)
    final = _tag(model.cfg.interactions + 1, 0, n - 1)
    cfgs = model.cfg.branches
    if k == 0:
        stub = cls[:, 0, :1] * 0  # a stand-in tied to the graph, so the receives have a backward here
        feats = [x] + [
            exchange(stub, (cfgs[o].grid ** 2, cfgs[o].dim), routes(groups.layout, groups.rank, o, batch),
                     final + 2 * o)
            for o in range(1, n)
        ]
        return feats, None
    got = exchange(x, (1,), routes(groups.layout, groups.rank, 0, batch), final + 2 * k)
    return None, 0.0 * got.sum()


def segmentation_criterion(model: PIIP, feats: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy of the merged map against masks at the finest grid."""
    seg = model.seg_head(model.merge(feats))  # (B, classes, G, G)
    target = F.interpolate(masks[:, None].float(), size=seg.shape[-2:], mode="nearest")[:, 0].long()
    return F.cross_entropy(seg, target)


def owner_branch(name: str) -> int:
    """The branch whose group computes with parameter `name` (see `owned_parameters`)."""
    parts = name.split(".")
    if parts[0] in ("branches", "cls_heads"):
        return int(parts[1])
    if parts[0] == "piip":  # the detector's backbone (detection.PIIPDetector)
        return owner_branch(".".join(parts[1:]))
    if parts[0] == "units":
        unit = int(parts[2])
        return unit if parts[3] in ("a_to_b", "into_a") else unit + 1
    return 0  # merge, seg_head, the detector's pyramid and heads


def full_state(model: PIIP, groups: BranchGroups) -> dict[str, torch.Tensor]:
    """Every parameter as trained, on every rank: each is broadcast from the first rank of
    the branch group that owns it (a rank's copies of other branches' parameters never
    moved). Collective over all ranks."""
    import torch.distributed as dist

    state = {}
    for name, p in model.named_parameters():
        t = p.detach().clone()
        dist.broadcast(t, src=groups.layout.ranks(owner_branch(name))[0])
        state[name] = t
    for name, b in model.named_buffers():
        state[name] = b.detach().clone()
    return state


def owned_parameters(model: PIIP, groups: BranchGroups) -> dict[str, object]:
    """Parameter name -> the branch group that computes with it, for this rank's branch.

    A branch owns its ViT, its classification head, and its side of each neighbouring
    interaction unit (unit k: a_to_b and into_a on branch k; b_to_a and into_b on branch
    k+1); branch 0 also owns the merge and the segmentation head.
    """
    return {name: groups.group for name, _ in model.named_parameters() if owner_branch(name) == groups.branch}
