import json

import pytest
import torch

from tests.v2pe_helpers import TILE, data_config
from workloads.data_errors import DataError
from workloads.v2pe.data import load_samples
from workloads.v2pe.synth import PALETTE, SynthConfig, make_sample, write_dataset
from workloads.v2pe.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", ["marked", "count", "colour", "needle"])
@pytest.mark.parametrize("tokens", [1024, 8192])
def test_token_counts_are_exact(tmp_path, task, tokens):
    cfg = SynthConfig(tokens=tokens, images=5, task=task, tile=TILE, tokens_per_tile=4, seed=1)
    path = write_dataset(str(tmp_path / task), cfg, samples=2)
    samples = load_samples(path, tokenizer=TOK, cfg=data_config(max_tokens=tokens))
    assert [len(s) for s in samples] == [tokens, tokens]
    assert all(s.pixels.shape[0] == 5 for s in samples)  # square images: one tile each


def test_long_sample_is_exact_at_a_million_tokens():
    """A 1M-token sample (64 images of 256 tokens): counted on the rendered ids."""
    from workloads.v2pe.chat import render_tokens

    cfg = SynthConfig(tokens=2**20, images=64, task="colour", tile=16, tokens_per_tile=256)  # small pictures
    record, images = make_sample(cfg, 0, TOK)
    convs = [("system", record["conversations"][0]["value"]), ("user", record["conversations"][1]["value"]),
             ("assistant", record["answer"])]
    ids, _ = render_tokens(convs, [1] * 64, tokenizer=TOK, tokens_per_tile=256)
    assert len(ids) == 2**20 and len(images) == 64
    assert ids.count(TOK.img_context_id) == 64 * 256


def _pixel(img, x, y):
    return img.getpixel((x, y))


def _nearest_colour(img) -> str:
    corner = torch.tensor(_pixel(img, 1, 1), dtype=torch.float)
    return min(PALETTE, key=lambda c: float((torch.tensor(PALETTE[c], dtype=torch.float) - corner).norm()))


@pytest.mark.parametrize("task", ["marked", "count", "colour", "needle"])
def test_answer_key_matches_the_pictures(tmp_path, task):
    from PIL import Image

    cfg = SynthConfig(tokens=4096, images=6, task=task, tile=TILE, tokens_per_tile=4, seed=7)
    path = write_dataset(str(tmp_path), cfg, samples=5)
    for line in open(path):
        rec = json.loads(line)
        imgs = [Image.open(tmp_path / name).convert("RGB") for name in rec["image"]]
        # A marker is a black square over the centre; backgrounds are never that dark.
        has_marker = [max(_pixel(im, TILE // 2, TILE // 2)) < 20 for im in imgs]
        if task == "needle":  # the marked image's colour; the images carry no numbers
            assert sum(has_marker) == 1 and rec["answer"] == _nearest_colour(imgs[has_marker.index(True)])
            assert "Image 1" not in rec["conversations"][1]["value"]
        elif task == "marked":
            assert sum(has_marker) == 1 and rec["answer"] == f"Image {has_marker.index(True) + 1}"
        elif task == "count":
            assert rec["answer"] == str(sum(has_marker))
        else:
            k = int(rec["conversations"][1]["value"].split("colour of image ")[1].split("?")[0]) - 1
            assert rec["answer"] == _nearest_colour(imgs[k])
        assert rec["conversations"][0] == {"from": "system", "value": cfg.system}
        assert rec["conversations"][2]["value"] == rec["answer"]


def test_too_short_for_its_images_is_an_error():
    with pytest.raises(DataError, match=r"synthetic sample 0: 40 images and the question need \d+ tokens"):
        make_sample(SynthConfig(tokens=512, images=40, tokens_per_tile=256), 0, TOK)


def test_image_counts_are_drawn_per_sample_and_the_tokens_stay_exact(tmp_path):
    """min_images: each sample has its own count within the range (seeded), and the
    filler still makes every sample exactly `tokens` long."""
    cfg = SynthConfig(tokens=1024, images=8, min_images=1, task="needle", tile=TILE, tokens_per_tile=4, seed=3)
    path = write_dataset(str(tmp_path), cfg, samples=24)
    records = [json.loads(line) for line in open(path)]
    counts = [len(r["image"]) for r in records]
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) >= 4
    assert [len(make_sample(cfg, i, TOK)[0]["image"]) for i in range(24)] == counts  # deterministic
    samples = load_samples(path, tokenizer=TOK, cfg=data_config(max_tokens=1024))
    assert {len(s) for s in samples} == {1024}
    with pytest.raises(ValueError, match="min_images must be within 1..images=8, got 9"):
        SynthConfig(tokens=1024, images=8, min_images=9)


def test_an_image_pool_shares_files_and_keeps_the_answer_keys(tmp_path):
    from PIL import Image

    cfg = SynthConfig(tokens=4096, images=12, task="needle", tile=TILE, tokens_per_tile=4, seed=3, image_pool=2)
    path = write_dataset(str(tmp_path), cfg, samples=6)
    records = [json.loads(line) for line in open(path)]
    names = {n for rec in records for n in rec["image"]}
    assert len(names) <= 8 * 2 * 2 < 6 * 12  # colours x (marked, plain) x pool: shared, not one per picture
    assert {p.name for p in (tmp_path / "images").iterdir()} == {n.split("/")[1] for n in names}
    for rec in records:
        imgs = [Image.open(tmp_path / name).convert("RGB") for name in rec["image"]]
        has_marker = [max(_pixel(im, TILE // 2, TILE // 2)) < 20 for im in imgs]
        assert sum(has_marker) == 1 and rec["answer"] == _nearest_colour(imgs[has_marker.index(True)])
        assert [_nearest_colour(im) for im in imgs] == rec["colours"]
