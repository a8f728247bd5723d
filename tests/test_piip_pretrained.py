"""A PIIP branch initialised from a published ViT checkpoint (timm / DeiT layouts)."""

import pytest
import torch
from safetensors.torch import save_file

from workloads.piip.model import Branch, BranchConfig
from workloads.piip.pretrained import load_branch

CFG = BranchConfig(size="m", resolution=64)  # width 64, 4 blocks, a 4x4 grid


def published(seed=0, *, grid=4, deit_names=False, dist=False, layer_scale=True):
    """A ViT state dict as timm (or the DeiT authors) saves it, with its classifier."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    c, hid = 64, 256
    sd = {"cls_token": r(1, 1, c), "pos_embed": r(1, (2 if dist else 1) + grid * grid, c),
          "patch_embed.proj.weight": r(c, 3, 16, 16), "patch_embed.proj.bias": r(c),
          "norm.weight": r(c), "norm.bias": r(c), "head.weight": r(1000, c), "head.bias": r(1000)}
    if dist:
        sd |= {"dist_token": r(1, 1, c), "head_dist.weight": r(1000, c), "head_dist.bias": r(1000)}
    for i in range(4):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": r(c), p + "norm1.bias": r(c), p + "attn.qkv.weight": r(3 * c, c),
               p + "attn.qkv.bias": r(3 * c), p + "attn.proj.weight": r(c, c), p + "attn.proj.bias": r(c),
               p + "norm2.weight": r(c), p + "norm2.bias": r(c), p + "mlp.fc1.weight": r(hid, c),
               p + "mlp.fc1.bias": r(hid), p + "mlp.fc2.weight": r(c, hid), p + "mlp.fc2.bias": r(c)}
        if layer_scale:
            sd |= ({p + "gamma_1": r(c), p + "gamma_2": r(c)} if deit_names else
                   {p + "ls1.gamma": r(c), p + "ls2.gamma": r(c)})
    return sd


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("deit_names,dist,layer_scale", [(False, False, True), (True, True, True), (False, False, False)])
def test_a_published_vit_lands_in_the_branch(tmp_path, fmt, deit_names, dist, layer_scale):
    sd = published(deit_names=deit_names, dist=dist, layer_scale=layer_scale)
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save({"model": sd}, path)  # wrapped, as the DeiT releases are
    else:
        save_file(sd, str(path))
    branch = Branch(CFG)
    left = load_branch(branch, str(path))
    assert set(left) == {"norm.weight", "norm.bias", "head.weight", "head.bias"} | (
        {"dist_token", "head_dist.weight", "head_dist.bias"} if dist else set())
    got = dict(branch.named_parameters())
    assert torch.equal(got["blocks.2.qkv.weight"], sd["blocks.2.attn.qkv.weight"])
    assert torch.equal(got["patch_embed.weight"], sd["patch_embed.proj.weight"])
    # the token slots dropped; the same 4x4 grid: the position embedding itself
    assert torch.equal(got["pos_embed"], sd["pos_embed"][:, 2 if dist else 1:])
    gamma = sd.get("blocks.1.gamma_1", sd.get("blocks.1.ls1.gamma"))
    assert torch.equal(got["blocks.1.gamma1"], gamma if layer_scale else torch.ones(64))


def test_the_position_grid_is_resized_to_the_branch(tmp_path):
    sd = published(grid=14)  # pretrained at 224 pixels
    torch.save(sd, tmp_path / "vit.pth")
    branch = Branch(CFG)
    load_branch(branch, str(tmp_path / "vit.pth"))
    want = torch.nn.functional.interpolate(sd["pos_embed"][:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2),
                                           size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(branch.pos_embed, want.permute(0, 2, 3, 1).reshape(1, 16, 64), rtol=0, atol=0)


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("blocks.3.mlp.fc2.weight"), r"lacks 1 tensor\(s\) of branch m: blocks.3.fc2.weight$"),
    (lambda sd: sd.update({"blocks.0.attn.q_norm.weight": torch.ones(64)}), r"no part of a ViT branch: "
                                                                             r"blocks.0.attn.q_norm.weight$"),
    (lambda sd: sd.update({"blocks.4.norm1.weight": torch.ones(64)}), r"beyond branch m's 4 blocks"),
    (lambda sd: sd.update({"blocks.0.mlp.fc1.weight": torch.ones(128, 64)}),
     r"vit.pth is not branch m's shape: 1 tensor\(s\) differ \(blocks.0.fc1.weight is \(128, 64\), wants \(256, 64\)"),
    # a checkpoint of another model size: every tensor at fault is named, not the first one met
    (lambda sd: sd.update({k: torch.ones(*[2 * d for d in v.shape]) for k, v in sd.items() if "blocks.1." in k}),
     r"vit.pth is not branch m's shape: 14 tensor\(s\) differ \(.*; all of them: blocks.1.norm1.weight, "
     r"blocks.1.norm1.bias, blocks.1.qkv.weight, .*blocks.1.fc2.bias, blocks.1.gamma1, blocks.1.gamma2\)$"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path, change, message):
    from workloads.piip.pretrained import PretrainedError

    sd = published()
    change(sd)
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(PretrainedError, match=message):  # by its class: the driver does not restart into it
        load_branch(Branch(CFG), str(tmp_path / "vit.pth"))
