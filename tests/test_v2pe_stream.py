"""The streaming dataset against the eager reader, and what its index holds."""

import json
from dataclasses import replace

import pytest
import torch

from tests.v2pe_helpers import TILE, data_config, make_records, write_image
from workloads.v2pe.data import DataError, LoadReport, load_samples, make_batch, pack_greedy, shard_batch
from workloads.v2pe.stream import StreamingDataset, build_index, ensure_index, load_index, tiles_for
from workloads.v2pe.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _same(a, b):
    for name in ("input_ids", "targets", "positions", "visual_index", "loss_weight", "pixels", "cu_seqlens"):
        # the same functions on the same inputs: exact
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    assert (a.num_tiles, a.rope_len) == (b.num_tiles, b.rope_len)


@pytest.mark.parametrize("cp,a2a", [(1, 1), (2, 1), (4, 1), (4, 2)])
def test_streaming_batches_equal_the_eager_reader(tmp_path, cp, a2a):
    path, _ = make_records(str(tmp_path))
    cfg = data_config(max_tokens=1024, position_mode="v2pe_rnd")
    eager = load_samples(path, tokenizer=TOK, cfg=cfg)
    rows = pack_greedy(eager, budget=1024, multiple=2 * cp)
    index = build_index(path, tokenizer=TOK, cfg=cfg)
    for rank in range(cp):
        ds = StreamingDataset(index, tokenizer=TOK, cfg=cfg, cp=cp, cp_rank=rank, a2a=a2a, budget=1024)
        assert [len(r) for r in ds.rows] == [len(r) for r in rows]
        for r, row in enumerate(rows):
            want = shard_batch(make_batch(row, tokenizer=TOK, cfg=cfg, cp=cp, generator=torch.Generator().manual_seed(r)),
                               cp, rank, a2a=a2a)
            got, stats = ds.batch(r, r, next_key=((r + 1) % len(rows), r + 1))
            _same(got, want)
            assert stats.tokens == sum(-(-len(s) // (2 * cp)) * 2 * cp for s in row)
        ds.close()


def test_a_rank_decodes_only_the_images_of_its_tiles(tmp_path, monkeypatch):
    path, _ = make_records(str(tmp_path))  # images: a (1 tile), b (2 tiles + thumbnail), c (1 tile)
    cfg = data_config(max_tokens=1024)
    index = build_index(path, tokenizer=TOK, cfg=cfg)
    opened = []
    import workloads.v2pe.stream as stream

    real = stream.open_image
    monkeypatch.setattr(stream, "open_image", lambda p, sample: opened.append(p.rsplit("/", 1)[1]) or real(p, sample=sample))
    # 5 tiles over 4 ranks: rank 0 gets tiles 0-1 (a, and b's first), rank 3 the last (c)
    for rank, want in [(0, ["a.png", "b.png"]), (3, ["c.png"])]:
        opened.clear()
        StreamingDataset(index, tokenizer=TOK, cfg=cfg, cp=4, cp_rank=rank, budget=1024, prefetch=False).batch(0, 0)
        assert opened == want


def test_index_counts_from_headers_and_is_stored_once(tmp_path):
    path, _ = make_records(str(tmp_path))
    cfg = data_config(max_tokens=1024)
    index = build_index(path, tokenizer=TOK, cfg=cfg)
    eager = load_samples(path, tokenizer=TOK, cfg=cfg)
    assert index.tokens.tolist() == [len(s) for s in eager]
    assert [sum(index.tiles_of(i)) for i in range(len(index))] == [s.pixels.shape[0] for s in eager]
    assert tiles_for(3 * TILE, TILE, cfg) == 3  # max_tiles=2: 2x1 + thumbnail
    run = str(tmp_path / "run")
    url = ensure_index(path, run, tokenizer=TOK, cfg=cfg)
    assert ensure_index(path, run, tokenizer=TOK, cfg=cfg) == url  # found, not rebuilt
    loaded = load_index(url)
    assert loaded.tokens.tolist() == index.tokens.tolist() and loaded.report.loaded == 3
    # another tiling setting is another index
    assert ensure_index(path, run, tokenizer=TOK, cfg=replace(cfg, max_tiles=1)) != url


def test_index_skips_or_stops_on_bad_samples_like_the_eager_reader(tmp_path):
    write_image(str(tmp_path / "a.png"), 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    good = {"id": "good", "image": "a.png",
            "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]}
    lines = [json.dumps(good), "{oops", json.dumps(dict(good, id="nofile", image="missing.png")),
             json.dumps(dict(good, id="broken", image="broken.png")), json.dumps(dict(good, id="good2"))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skip = data_config(max_tokens=1024, on_bad_sample="skip")
    index = build_index(str(path), tokenizer=TOK, cfg=skip)
    report = LoadReport(str(path))
    load_samples(str(path), tokenizer=TOK, cfg=skip, report=report)
    assert (index.report.loaded, index.report.skipped) == (report.loaded, report.skipped) == (2, {"json": 1, "image": 2})
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        build_index(str(path), tokenizer=TOK, cfg=data_config(max_tokens=1024))


def test_image_paths_start_at_image_root(tmp_path):
    """The authors' Long-VQA / Long-MR JSONL names images relative to their meta file's
    `root`, not to the JSONL: data.image_root says where that is."""
    images, ann = tmp_path / "image" / "long_vqa", tmp_path / "annotation"
    images.mkdir(parents=True)
    ann.mkdir()
    write_image(str(images / "p1.png"), 1)
    write_image(str(images / "p2.png"), 2, size=(2 * TILE, TILE))
    rec = {"id": "lv0", "image": ["p1.png", "p2.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "Image 2"}]}
    (ann / "train.jsonl").write_text(json.dumps(rec) + "\n")
    cfg = replace(data_config(max_tokens=1024), image_root=str(images))
    eager = load_samples(str(ann / "train.jsonl"), tokenizer=TOK, cfg=cfg)
    index = build_index(str(ann / "train.jsonl"), tokenizer=TOK, cfg=cfg)
    got, _ = StreamingDataset(index, tokenizer=TOK, cfg=cfg, cp=1, cp_rank=0, budget=1024, prefetch=False).batch(0, 0)
    assert got.num_tiles == eager[0].pixels.shape[0] == 1 + 3
    torch.testing.assert_close(got.pixels, eager[0].pixels, rtol=0, atol=0)  # same decode: exact
    with pytest.raises(DataError, match=r"p1.png does not exist"):
        build_index(str(ann / "train.jsonl"), tokenizer=TOK, cfg=data_config(max_tokens=1024))


def test_a_header_past_the_first_block_is_read_whole(tmp_path):
    from PIL import Image

    from workloads.v2pe.stream import HEADER_BYTES, _header_size

    # A JPEG whose ICC profile (before the frame header) is larger than the first block.
    Image.new("RGB", (3 * TILE, TILE), (10, 20, 30)).save(tmp_path / "big.jpg", icc_profile=b"\0" * (2 * HEADER_BYTES))
    assert (tmp_path / "big.jpg").stat().st_size > 2 * HEADER_BYTES
    assert _header_size(str(tmp_path / "big.jpg"), "s") == (3 * TILE, TILE)
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # smaller than a block and broken
    with pytest.raises(DataError, match=r"sample s: image file .*short.png cannot be read"):
        _header_size(str(tmp_path / "short.png"), "s")
