"""Small V2PE fixtures shared by tests (tiny model on 56-pixel tiles: 4 tokens per tile)."""

import json
import os

import torch

from workloads.v2pe.data import DataConfig, encode_sample
from workloads.v2pe.model import V2PEModel, model_config
from workloads.v2pe.tokenizer import ByteTokenizer

TILE = 56


def tiny_config():
    return model_config("tiny", vision_image_size=TILE)


def data_config(**kw):
    cfg = tiny_config()
    return DataConfig(tile=TILE, tokens_per_tile=cfg.tokens_per_tile, max_tiles=2, **kw)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = V2PEModel(tiny_config())
    # Non-zero class token / position embeddings and layer scales, so every parameter
    # has a gradient worth comparing.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def write_image(path, seed, size=(TILE, TILE)):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8)
    Image.fromarray(arr.numpy()).save(path)


def make_records(tmp_dir, n=3):
    """n chat samples with 0, 1 and 2 images (one wide image -> 2 tiles + thumbnail)."""
    os.makedirs(tmp_dir, exist_ok=True)
    write_image(os.path.join(tmp_dir, "a.png"), 1)
    write_image(os.path.join(tmp_dir, "b.png"), 2, size=(2 * TILE, TILE))
    write_image(os.path.join(tmp_dir, "c.png"), 3)
    recs = [
        {"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi!"}]},
        {"id": "one-image", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}]},
        {"id": "two-images", "image": ["b.png", "c.png"],
         "conversations": [{"from": "human", "value": "<image> and <image>: which is wider?"},
                           {"from": "gpt", "value": "the first"}]},
    ][:n]
    path = os.path.join(tmp_dir, "data.jsonl")
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path, recs


def encoded(tmp_dir):
    tok = ByteTokenizer()
    _, recs = make_records(tmp_dir)
    return [encode_sample(r, tokenizer=tok, cfg=data_config(), base_dir=tmp_dir) for r in recs], tok
