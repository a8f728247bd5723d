import json
import os

import pytest
import torch

from parallelism.zigzag import zigzag_unshard
from tests.v2pe_helpers import TILE, data_config, make_records, write_image
from workloads.data_errors import DataError
from workloads.v2pe.data import encode_sample, load_samples
from workloads.v2pe.images import tile_image
from workloads.v2pe.packing import pack, pack_greedy, shard_batch
from workloads.v2pe.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_tokenizer_round_trip_with_specials():
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> héllo<|im_end|>"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert ids.count(TOK.img_context_id) == 1 and ids[1] < 256


def test_dynamic_tiling_follows_aspect_ratio(tmp_path):
    from PIL import Image

    square = Image.new("RGB", (TILE, TILE))
    wide = Image.new("RGB", (3 * TILE, TILE))
    assert tile_image(square, tile=TILE, max_tiles=6).shape == (1, 3, TILE, TILE)  # no thumbnail for one tile
    assert tile_image(wide, tile=TILE, max_tiles=6).shape == (4, 3, TILE, TILE)  # 3x1 grid + thumbnail
    assert tile_image(wide, tile=TILE, max_tiles=2).shape == (3, 3, TILE, TILE)  # capped at 2x1 + thumbnail


def test_encode_expands_images_and_supervises_only_the_answer(tmp_path):
    path, recs = make_records(str(tmp_path))
    s = load_samples(path, tokenizer=TOK, cfg=data_config())[2]  # two images: 3 tiles + 1 tile
    assert int((s.input_ids == TOK.img_context_id).sum()) == (3 + 1) * 4
    assert int((s.input_ids == TOK.img_start_id).sum()) == 2 and s.pixels.shape[0] == 4
    # The supervised targets spell the assistant's answer followed by <|im_end|>, and nothing after.
    sup = s.targets[s.targets != -100].tolist()
    assert TOK.decode(sup) == "the first<|im_end|>"
    # targets are the next token: wherever supervised, target[t] == input_ids[t+1]
    idx = (s.targets != -100).nonzero().flatten()
    assert torch.equal(s.targets[idx], s.input_ids[idx + 1])


def test_bad_samples_name_themselves(tmp_path):
    write_image(str(tmp_path / "a.png"), 0)
    cfg = data_config()
    rec = {"id": "s7", "image": ["a.png", "a.png"],
           "conversations": [{"from": "human", "value": "<image> one"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match=r"sample s7: 2 image\(s\) but 1 '<image>' placeholder"):
        encode_sample(rec, tokenizer=TOK, cfg=cfg, base_dir=str(tmp_path))
    rec = {"id": "s8", "image": "missing.png",
           "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match=r"sample s8: image file .*missing.png does not exist"):
        encode_sample(rec, tokenizer=TOK, cfg=cfg, base_dir=str(tmp_path))
    rec = {"id": "s9", "conversations": [{"from": "human", "value": "q" * 100}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match=r"sample s9: \d+ tokens exceed max_tokens=64 \(nothing is truncated\)"):
        encode_sample(rec, tokenizer=TOK, cfg=data_config(max_tokens=64), base_dir=str(tmp_path))
    rec = {"id": "s10", "conversations": [{"from": "robot", "value": "x"}]}
    with pytest.raises(DataError, match=r"sample s10: conversations\[0\]"):
        encode_sample(rec, tokenizer=TOK, cfg=cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_samples(str(bad), tokenizer=TOK, cfg=cfg)


def test_packing_pads_documents_and_keeps_every_label(tmp_path):
    path, _ = make_records(str(tmp_path))
    samples = load_samples(path, tokenizer=TOK, cfg=data_config())
    batch = pack(samples, tokenizer=TOK, tokens_per_tile=4, multiple=6, mode="default")
    lens = torch.diff(batch.cu_seqlens).tolist()
    assert all(n % 6 == 0 for n in lens)
    # Every supervised target of every sample survives packing, in order.
    want = torch.cat([s.targets[s.targets != -100] for s in samples])
    assert torch.equal(batch.targets[batch.targets != -100], want)
    # Positions restart at 0 for each document.
    assert all(float(batch.positions[0, a]) == 0.0 for a in batch.cu_seqlens[:-1].tolist())


def test_context_parallel_shards_reassemble(tmp_path):
    path, _ = make_records(str(tmp_path))
    samples = load_samples(path, tokenizer=TOK, cfg=data_config())
    batch = pack(samples, tokenizer=TOK, tokens_per_tile=4, multiple=8, mode="v2pe_fix", stride=64)
    shards = [shard_batch(batch, 4, r) for r in range(4)]
    for name in ("input_ids", "targets", "positions", "visual_index", "loss_weight"):
        assert torch.equal(zigzag_unshard([getattr(s, name) for s in shards], cu_seqlens=batch.cu_seqlens),
                           getattr(batch, name)), name
    # The tiles are split without overlap and cover the batch.
    assert torch.equal(torch.cat([s.pixels for s in shards]), batch.pixels)


def test_greedy_packing_respects_the_budget(tmp_path):
    path, _ = make_records(str(tmp_path))
    samples = load_samples(path, tokenizer=TOK, cfg=data_config())
    rows = pack_greedy(samples, budget=max(len(s) for s in samples) + 8, multiple=4)
    assert [s.sample_id for r in rows for s in r] == [s.sample_id for s in samples]
    with pytest.raises(DataError, match="exceed the packing budget 8"):
        pack_greedy(samples, budget=8, multiple=4)


def test_reads_through_fsspec_urls(tmp_path):
    """Paths go through fsspec, so s3:// works like any other filesystem URL."""
    import fsspec

    path, recs = make_records(str(tmp_path))
    mem = fsspec.filesystem("memory")
    for name in ("a.png", "b.png", "c.png"):
        mem.pipe(f"/v2pe/{name}", open(os.path.join(tmp_path, name), "rb").read())
    mem.pipe("/v2pe/data.jsonl", "\n".join(json.dumps(r) for r in recs).encode())
    local = load_samples(path, tokenizer=TOK, cfg=data_config())
    remote = load_samples("memory://v2pe/data.jsonl", tokenizer=TOK, cfg=data_config())
    for a, b in zip(local, remote):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixels, b.pixels)


def test_position_mode_comes_from_config(tmp_path):
    from workloads.v2pe.packing import make_batch

    path, _ = make_records(str(tmp_path))
    samples = load_samples(path, tokenizer=TOK, cfg=data_config())
    fix = make_batch(samples, tokenizer=TOK, cfg=data_config(position_mode="v2pe_fix", position_stride=64), cp=2)
    plain = make_batch(samples, tokenizer=TOK, cfg=data_config(position_mode="default"), cp=2)
    ctx = fix.input_ids == TOK.img_context_id
    steps = torch.diff(fix.positions[ctx])
    assert (steps == 0.25).any() and not (torch.diff(plain.positions[ctx]) == 0.25).any()
    with pytest.raises(ValueError, match=r"mode 'v2pe_fix' needs stride, an integer in 1..256; got None"):
        make_batch(samples, tokenizer=TOK, cfg=data_config(position_mode="v2pe_fix"), cp=2)
    with pytest.raises(ValueError, match=r"mode='rnd' is not one of"):
        make_batch(samples, tokenizer=TOK, cfg=data_config(position_mode="rnd"), cp=2)


def _mixed_file(tmp_path):
    """Good records (from make_records) interleaved with one bad record of each kind."""
    path, recs = make_records(str(tmp_path))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header, no image
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    ask = [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]
    bad = [
        {"id": "corrupt", "image": "corrupt.png", "conversations": ask},
        {"id": "truncated", "image": "truncated.png", "conversations": ask},
        {"id": "placeholders", "image": ["a.png", "a.png"], "conversations": ask},
        {"id": "empty", "conversations": []},
        {"id": "long", "conversations": [{"from": "human", "value": "q" * 5000}, {"from": "gpt", "value": "a"}]},
    ]
    lines = [json.dumps(r) for r in recs[:1]] + [json.dumps(r) for r in bad[:3]] + [json.dumps(recs[1]), "{not json"]
    lines += [json.dumps(r) for r in bad[3:]] + [json.dumps(recs[2])]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    return str(mixed), path


def test_bad_samples_are_skipped_and_counted_by_config(tmp_path):
    from workloads.data_errors import LoadReport

    mixed, clean = _mixed_file(tmp_path)
    report = LoadReport(mixed)
    got = load_samples(mixed, tokenizer=TOK, cfg=data_config(max_tokens=2048, on_bad_sample="skip"), report=report)
    want = load_samples(clean, tokenizer=TOK, cfg=data_config(max_tokens=2048))
    # the three good samples survive unchanged, in order; nothing was truncated
    assert [s.sample_id.split()[0] for s in got] == ["text-only", "one-image", "two-images"]
    for g, w in zip(got, want):
        assert torch.equal(g.input_ids, w.input_ids) and torch.equal(g.pixels, w.pixels)
    assert report.loaded == 3 and report.total_skipped == 6
    assert report.skipped == {"image": 2, "placeholders": 1, "json": 1, "conversation": 1, "too_long": 1}
    assert "6 skipped" in report.summary() and report.examples[0].startswith("sample corrupt")
    # the default stops at the first bad sample and names it
    with pytest.raises(DataError, match=r"sample corrupt \(.*mixed.jsonl:2\): image file .*corrupt.png cannot be read"):
        load_samples(mixed, tokenizer=TOK, cfg=data_config(max_tokens=2048))
    # a file with nothing usable is an error either way
    only_bad = tmp_path / "only-bad.jsonl"
    only_bad.write_text('{oops\n{"id": "e", "conversations": []}\n')
    with pytest.raises(DataError, match=r"only-bad.jsonl: no usable sample .*2 skipped"):
        load_samples(str(only_bad), tokenizer=TOK, cfg=data_config(on_bad_sample="skip"))


def test_records_of_the_wrong_shape_are_data_errors(tmp_path):
    cfg = data_config()
    for rec, message in [([1, 2], r"a record must be a JSON object"),
                         ({"id": "n", "image": 5, "conversations": []}, r"sample n: 'image' must be a path"),
                         ({"id": "t", "conversations": ["hello"]}, r"sample t: conversations\[0\] needs")]:
        with pytest.raises(DataError, match=message):
            encode_sample(rec, tokenizer=TOK, cfg=cfg)


def test_tiles_are_the_normalised_crops_of_the_resized_image():
    """Tiling normalises the grid at once and cuts it by a view; each tile must equal the
    crop normalised alone, row-major, then the thumbnail."""
    from PIL import Image

    from workloads.v2pe.images import IMAGENET_MEAN, IMAGENET_STD

    g = torch.Generator().manual_seed(0)
    img = Image.frombytes("RGB", (300, 100), (torch.rand(100, 300, 3, generator=g) * 255).to(torch.uint8).numpy().tobytes())
    tiles = tile_image(img, tile=TILE, max_tiles=6)  # a 3x1 grid + thumbnail

    def norm(im):
        x = torch.tensor(list(im.tobytes()), dtype=torch.uint8).view(TILE, TILE, 3).permute(2, 0, 1).float()
        return (x / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    resized = img.resize((3 * TILE, TILE), Image.BICUBIC)
    want = [norm(resized.crop((c * TILE, 0, (c + 1) * TILE, TILE))) for c in range(3)]
    want.append(norm(img.resize((TILE, TILE), Image.BICUBIC)))
    torch.testing.assert_close(tiles, torch.stack(want), rtol=0, atol=0)  # the same elementwise ops: exact


def test_file_cache_reads_a_file_once_within_its_budget(tmp_path, monkeypatch):
    import workloads.files as files

    for name, size in (("a", 100), ("b", 100), ("c", 150)):
        (tmp_path / name).write_bytes(bytes([ord(name)]) * size)
    reads = []
    real = files.fetch_files
    monkeypatch.setattr(files, "fetch_files", lambda paths, **kw: reads.extend(paths) or real(paths, **kw))
    cache = files.FileCache(budget_bytes=250)
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert cache.fetch([a, b, a])[a] == b"a" * 100 and reads == [a, b]  # asked twice, read once
    assert cache.fetch([b])[b] == b"b" * 100 and reads == [a, b]
    cache.fetch([c])  # 350 bytes > 250: the least recently used (a) goes
    assert reads == [a, b, c]
    cache.fetch([b, c, a])
    assert reads == [a, b, c, a]
    missing = str(tmp_path / "gone")
    assert isinstance(cache.fetch([missing])[missing], FileNotFoundError)
    cache.fetch([missing])
    assert reads.count(missing) == 2  # an error is not kept: asked again
