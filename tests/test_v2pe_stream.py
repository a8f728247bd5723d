"""The streaming dataset against the eager reader, and what its index holds."""

import json
from dataclasses import replace

import pytest
import torch

from tests.v2pe_helpers import TILE, data_config, make_records, write_image
from workloads.data_errors import DataError, LoadReport
from workloads.v2pe.data import load_samples
from workloads.v2pe.images import tiles_for
from workloads.v2pe.packing import make_batch, pack_greedy, shard_batch
from workloads.v2pe.stream import StreamingDataset, build_index, ensure_index, load_index
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
    monkeypatch.setattr(stream, "open_image",
                        lambda p, sample, **kw: opened.append(p.rsplit("/", 1)[1]) or real(p, sample=sample, **kw))
    fetched = []
    import workloads.files as files

    real_fetch = files.fetch_files
    monkeypatch.setattr(files, "fetch_files", lambda paths, **kw: fetched.extend(paths) or real_fetch(paths, **kw))
    # 5 tiles over 4 ranks: rank 0 gets tiles 0-1 (a, and b's first), rank 3 the last (c)
    for rank, want in [(0, ["a.png", "b.png"]), (3, ["c.png"])]:
        opened.clear()
        fetched.clear()
        ds = StreamingDataset(index, tokenizer=TOK, cfg=cfg, cp=4, cp_rank=rank, budget=1024, prefetch=False)
        first, _ = ds.batch(0, 0)
        assert opened == want
        assert [p.rsplit("/", 1)[1] for p in fetched] == want  # nor are other images read from storage
        again, _ = ds.batch(0, 0)  # the next epoch's row: decoded again, not read again
        assert [p.rsplit("/", 1)[1] for p in fetched] == want and opened == want + want
        torch.testing.assert_close(again.pixels, first.pixels, rtol=0, atol=0)  # the same bytes: exact


def test_index_counts_from_headers_and_is_stored_once(tmp_path):
    path, _ = make_records(str(tmp_path))
    cfg = data_config(max_tokens=1024)
    index = build_index(path, tokenizer=TOK, cfg=cfg)
    eager = load_samples(path, tokenizer=TOK, cfg=cfg)
    assert index.tokens.tolist() == [len(s) for s in eager]
    assert [sum(index.tiles_of(i)) for i in range(len(index))] == [s.pixels.shape[0] for s in eager]
    assert tiles_for(3 * TILE, TILE, cfg.max_tiles, cfg.tile, cfg.thumbnail) == 3  # max_tiles=2: 2x1 + thumbnail
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


def _dataset(folder, name, n, wide=False):
    """A JSONL of n one-image chats under folder/annotation, images under folder/image/name."""
    images, ann = folder / "image" / name, folder / "annotation"
    images.mkdir(parents=True, exist_ok=True)
    ann.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        write_image(str(images / f"{i}.png"), i, size=(3 * TILE, TILE) if wide else (TILE, TILE))
        lines.append(json.dumps({"id": f"{name}{i}", "image": [f"{i}.png"], "conversations": [
            {"from": "human", "value": f"<image>\nSample {i} of {name}?"}, {"from": "gpt", "value": str(i)}]}))
    (ann / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_authors_meta_file_mixes_datasets_with_repeat_and_roots(tmp_path):
    """data.train may be the authors' meta file: each dataset with its image root, its
    repeat_time (2: twice; 0.5: a seeded half) and its own max_dynamic_patch."""
    from workloads.v2pe.stream import open_sources, prepare_sources

    _dataset(tmp_path, "chart", 4, wide=True)
    _dataset(tmp_path, "doc", 6)
    meta = {"chart": {"root": "./image/chart", "annotation": "annotation/../annotation/chart.jsonl", "repeat_time": 2,
                      "max_dynamic_patch": 1, "data_augment": False, "length": 4},
            "doc": {"root": "image/doc", "annotation": "annotation/doc.jsonl", "repeat_time": 0.5}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = data_config(max_tokens=1024)  # max_tiles=2: a 3:1 image makes 2 tiles + thumbnail
    run = str(tmp_path / "run")
    prepare_sources(str(tmp_path / "meta.json"), run, tokenizer=TOK, cfg=cfg)
    sources, order, report = open_sources(str(tmp_path / "meta.json"), run, tokenizer=TOK, cfg=cfg, seed=0)
    assert report.loaded == 10 and [len(s.index) for s in sources] == [4, 6]
    per_source = torch.bincount(order[:, 0]).tolist()
    assert per_source == [8, 3]  # 4 x 2, and half of 6
    assert order[:8, 1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    again = open_sources(str(tmp_path / "meta.json"), run, tokenizer=TOK, cfg=cfg, seed=0)[1]
    assert torch.equal(order, again)  # a function of the seed: a resumed run walks the same order
    assert [sum(sources[0].index.tiles_of(i)) for i in range(4)] == [1] * 4  # chart's own max_dynamic_patch=1
    # a row of the mixture equals the eager reader's encoding of the same records
    ds = StreamingDataset(sources, order=order, tokenizer=TOK, cp=2, cp_rank=0, budget=1024, prefetch=False)
    got, _ = ds.batch(0, 0)
    eager = [load_samples(str(tmp_path / "annotation" / f"{n}.jsonl"), tokenizer=TOK,
                          cfg=replace(cfg, image_root=str(tmp_path / "image" / n), max_tiles=t))
             for n, t in (("chart", 1), ("doc", 2))]
    want_row = [eager[s][i] for s, i in order[ds.rows[0]].tolist()]
    want = shard_batch(make_batch(want_row, tokenizer=TOK, cfg=cfg, cp=2, generator=torch.Generator().manual_seed(0)),
                       2, 0)
    _same(got, want)


@pytest.mark.parametrize("entry,message", [
    ({"root": "x"}, r"dataset 'd' needs 'annotation'"),
    ({"annotation": "a.jsonl", "repeat_time": 0}, r"dataset 'd': repeat_time must be a number > 0, got 0"),
    ({"annotation": "a.jsonl", "max_dynamic_patch": "6"}, r"max_dynamic_patch must be an integer >= 1"),
    ({"annotation": "a.jsonl", "weight": 2}, r"dataset 'd': weight not understood"),
    ({"annotation": "missing.jsonl"}, r"data.train: .*missing.jsonl is not a file \(named in .*meta.json\)"),
])
def test_bad_meta_files_are_named(tmp_path, entry, message):
    from workloads.v2pe.stream import prepare_sources

    (tmp_path / "meta.json").write_text(json.dumps({"d": entry}))
    with pytest.raises(DataError, match=message):
        prepare_sources(str(tmp_path / "meta.json"), str(tmp_path / "run"), tokenizer=TOK,
                        cfg=data_config(max_tokens=1024))
