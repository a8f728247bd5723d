"""A PIIP branch initialised from a published ViT checkpoint, as the PIIP authors start
from DeiT and AugReg weights (`piip.pretrained`, one file per branch; the user downloads
them, longview downloads nothing).

Layouts read: timm's names (DeiT, DeiT III and AugReg as timm saves them: `patch_embed.proj`,
`blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, ...) and the DeiT authors' own (`blocks.N.gamma_1`),
in a `.safetensors` file or a `.pth` read with `weights_only` (a `model` or `state_dict`
entry when the file wraps one). The classifier (`head`, `head_dist`, `norm`, `fc_norm`)
is not part of a branch and is left out; the position embedding loses its class-token
(and distillation-token) slots and is resized to the branch's grid (bicubic, as the
authors' code resizes it). A checkpoint without layer scale leaves the branch's at 1
(the block as trained). Any other key, a missing one or a shape that does not fit is an
error that names it: a silently half-loaded branch is worse than none.
"""

from __future__ import annotations

import io
import re

import torch
import torch.nn.functional as F

from .model import Branch

# (published name pattern, branch parameter); {i} is a block index
_NAMES = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"cls_token", "cls_token"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (r"blocks\.(\d+)\.(?:ls1\.gamma|gamma_1)", r"blocks.\1.gamma1"),
    (r"blocks\.(\d+)\.(?:ls2\.gamma|gamma_2)", r"blocks.\1.gamma2"),
]
_CLASSIFIER = re.compile(r"(head|head_dist|norm|fc_norm|pre_logits)\..*|dist_token")
_OPTIONAL = re.compile(r"blocks\.\d+\.gamma[12]")  # layer scale: DeiT III has it, DeiT and AugReg do not


class PretrainedError(ValueError):
    """A piip.pretrained file that cannot seed its branch (not there, not a checkpoint, or
    of another shape): a restart would meet it again, so the run ends at once."""


def read_checkpoint(url: str) -> dict[str, torch.Tensor]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise PretrainedError(f"piip.pretrained: {url} is not a file")
    data = fs.cat_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle and zip errors of many kinds: one line naming the file
        raise PretrainedError(f"piip.pretrained: {url} is not a weights-only torch checkpoint ({e})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"piip.pretrained: {url} holds no state dict of tensors")
    return obj


def load_branch(branch: Branch, url: str) -> list[str]:
    """Copies a published ViT's weights into `branch`; returns the checkpoint keys left
    out (the classifier's)."""
    state = read_checkpoint(url)
    ours = dict(branch.named_parameters())
    got: dict[str, torch.Tensor] = {}
    unknown, skipped = [], []
    for name, t in state.items():
        if name == "pos_embed":
            got["pos_embed"] = _position_embedding(t, state, branch, url)
            continue
        for pattern, target in _NAMES:
            if re.fullmatch(pattern, name):
                got[re.sub(pattern, target, name)] = t
                break
        else:
            (skipped if _CLASSIFIER.fullmatch(name) else unknown).append(name)
    if unknown:
        raise PretrainedError(f"piip.pretrained: {url}: {len(unknown)} key(s) that are no part of a ViT branch: "
                              f"{', '.join(sorted(unknown))}")
    missing = sorted(n for n in ours if n not in got and not _OPTIONAL.fullmatch(n))
    if missing:
        raise PretrainedError(f"piip.pretrained: {url} lacks {len(missing)} tensor(s) of branch {branch.cfg.size}: "
                              f"{', '.join(missing)}")
    extra = sorted(n for n in got if n not in ours)
    if extra:
        raise PretrainedError(f"piip.pretrained: {url} has {len(extra)} tensor(s) beyond branch {branch.cfg.size}'s "
                              f"{branch.cfg.depth} blocks: {', '.join(extra)}")
    for name, t in got.items():
        if name == "cls_token" and t.numel() == ours[name].numel():
            got[name] = t.reshape(ours[name].shape)
    wrong = [(n, tuple(t.shape), tuple(ours[n].shape)) for n, t in got.items() if t.shape != ours[n].shape]
    if wrong:  # every one named: a checkpoint of another model size is wrong everywhere, not in one key
        shapes = "; ".join(f"{n} is {have}, wants {want}" for n, have, want in wrong[:3])
        raise PretrainedError(f"piip.pretrained: {url} is not branch {branch.cfg.size}'s shape: {len(wrong)} "
                              f"tensor(s) differ ({shapes}; all of them: {', '.join(n for n, _, _ in wrong)})")
    with torch.no_grad():
        for name, t in got.items():
            ours[name].copy_(t.to(ours[name].dtype))
    return skipped


def _position_embedding(t: torch.Tensor, state: dict, branch: Branch, url: str) -> torch.Tensor:
    """(1, prefix + n², C) -> (1, g², C): the token slots dropped, the grid resized."""
    prefix = 1 + ("dist_token" in state)
    n = t.shape[1] - prefix
    side = int(round(n ** 0.5))
    if side * side != n:
        side, prefix = int(round(t.shape[1] ** 0.5)), 0  # no token slots (some checkpoints keep none)
        if side * side != t.shape[1]:
            raise PretrainedError(f"piip.pretrained: {url}: pos_embed of {t.shape[1]} positions is not a square grid")
    grid = t[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, s, s)
    g = branch.cfg.grid
    if g != side:
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)
