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
