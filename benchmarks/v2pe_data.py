"""Streaming V2PE data from S3: index time, time to the first batch and peak RSS per rank
for a large JSONL against a small one, and whether reading data hides behind a step.

    .venv/bin/python benchmarks/v2pe_data.py --samples 20000 200 --images 2

Starts its own S3-protocol endpoint (rclone) on 127.0.0.1, writes each dataset there (a
chat JSONL, every sample with its own PNG and JPEG images), then for each size:
- index: `ensure_index` (the driver's once-per-run pass over text and image headers);
- per rank (a fresh process per CP rank, as a Ray worker): loading the index, building
  the dataset and its first batch: seconds and peak RSS;
- steady state: a tiny-model training step on CPU with the batch read from S3 (prefetch
  on) against the same step on a batch built beforehand.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILE = 112


def write_dataset(fs, root: str, samples: int, images: int) -> str:
    import random

    from PIL import Image

    rng = random.Random(samples)

    def image(i: int, j: int) -> tuple[str, bytes]:
        w, h = rng.choice([(TILE, TILE), (2 * TILE, TILE), (TILE, 2 * TILE)])
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        fmt = "PNG" if j % 2 == 0 else "JPEG"
        img.save(buf, format=fmt)
        return f"images/{i}-{j}.{fmt.lower()}", buf.getvalue()

    lines, files = [], []
    for i in range(samples):
        names = []
        for j in range(images):
            files.append(image(i, j))
            names.append(files[-1][0])
        text = " ".join(rng.choice(["long", "context", "vision", "language", "model"]) for _ in range(200))
        question = "\n".join(f"Image {j + 1}: <image>" for j in range(images)) + "\n" + text + "\nWhich is brightest?"
        lines.append(json.dumps({"id": f"s{i}", "image": names, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": f"Image {rng.randrange(images) + 1}"}]}))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda f: fs.pipe_file(f"{root}/{f[0]}", f[1]), files))
    fs.pipe_file(f"{root}/data.jsonl", ("\n".join(lines) + "\n").encode())
    return f"s3://{root}/data.jsonl"


def rank_main(args) -> None:
    """One CP rank: index -> dataset -> first batch; prints JSON."""
    import torch

    from benchmarks._measure import status_mib
    from workloads.v2pe.data import DataConfig
    from workloads.v2pe.stream import StreamingDataset, load_index
    from workloads.v2pe.tokenizer import ByteTokenizer

    t0 = time.perf_counter()
    cfg = DataConfig(max_tokens=8192, max_tiles=2, tile=TILE, tokens_per_tile=16)
    ds = StreamingDataset(load_index(args.index), tokenizer=ByteTokenizer(), cfg=cfg, cp=args.cp, cp_rank=args.rank,
                          budget=8192, prefetch=False)
    batch, _ = ds.batch(0, 0)
    print(json.dumps({"first_batch_s": time.perf_counter() - t0, "peak_rss_mib": status_mib("VmHWM"),
                      "tokens": int(batch.input_ids.numel()), "tiles": int(batch.pixels.shape[0])}))
    del torch


def steady_state(index_url: str, steps: int) -> dict:
    """Step time on CPU with the batch read from S3 (prefetch on) against a prepared batch."""
    import torch

    from workloads.engine import TrainingConfig, build_engine
    from workloads.v2pe.data import DataConfig
    from workloads.v2pe.model import V2PEModel, model_config
    from workloads.v2pe.stream import StreamingDataset, load_index
    from workloads.v2pe.tokenizer import ByteTokenizer
    from workloads.v2pe.train import TrainStepConfig, train_step

    torch.manual_seed(0)
    model = V2PEModel(model_config("tiny", vision_image_size=TILE, llm_hidden_size=256, llm_num_layers=4,
                                   llm_intermediate_size=1024, vision_num_layers=4))
    engine = build_engine(model, TrainingConfig(sharding="none", bf16=False))
    cfg = DataConfig(max_tokens=8192, max_tiles=2, tile=TILE, tokens_per_tile=16)
    ds = StreamingDataset(load_index(index_url), tokenizer=ByteTokenizer(), cfg=cfg, cp=1, cp_rank=0, budget=8192)
    step_cfg = TrainStepConfig(loss_chunk_tokens=2048)
    fixed, _ = ds.batch(0, 0)
    train_step(engine, fixed, cp_group=None, loss_group=None, hybrid=None, cfg=step_cfg)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        train_step(engine, fixed, cp_group=None, loss_group=None, hybrid=None, cfg=step_cfg)
    prebuilt = (time.perf_counter() - t) / steps
    n = len(ds.rows)
    ds.batch(1 % n, 1, next_key=(2 % n, 2))
    t = time.perf_counter()
    for s in range(2, steps + 2):
        batch, _ = ds.batch(s % n, s, next_key=((s + 1) % n, s + 1))
        train_step(engine, batch, cp_group=None, loss_group=None, hybrid=None, cfg=step_cfg)
    streamed = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    for s in range(2, steps + 2):  # the same, reading each batch in turn (no prefetch)
        batch, _ = ds.batch(s % n, s)
        train_step(engine, batch, cp_group=None, loss_group=None, hybrid=None, cfg=step_cfg)
    serial = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    for s in range(steps):
        ds._build((s % n, s))
    read_only = (time.perf_counter() - t) / steps
    ds.close()
    return {"step_prebuilt_s": prebuilt, "step_streamed_s": streamed, "step_serial_s": serial,
            "batch_read_s": read_only}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[20000, 200])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank-of", dest="index")
    ap.add_argument("--rank", type=int, default=0)
    args = ap.parse_args()
    if args.index:
        return rank_main(args)

    import fsspec

    from orchestrator.services import LocalServices
    from workloads.v2pe.data import DataConfig
    from workloads.v2pe.stream import ensure_index
    from workloads.v2pe.tokenizer import ByteTokenizer

    home = Path(f"/tmp/lv-bench-data-{os.getpid()}")
    svc = LocalServices(home)
    started = svc.up(bucket="lvbench", ray=False, mlflow=False)
    try:
        env = svc.env()
        os.environ.update(env)
        fs = fsspec.filesystem("s3", endpoint_url=started["s3"].url)
        fsspec.config.conf["s3"] = {"endpoint_url": started["s3"].url}
        cfg = DataConfig(max_tokens=8192, max_tiles=2, tile=TILE, tokens_per_tile=16)
        rows = []
        for n in args.samples:
            t = time.perf_counter()
            path = write_dataset(fs, f"lvbench/d{n}", n, args.images)
            written = time.perf_counter() - t
            t = time.perf_counter()
            url = ensure_index(path, f"s3://lvbench/run{n}", tokenizer=ByteTokenizer(), cfg=cfg)
            index_s = time.perf_counter() - t
            ranks = []
            for r in range(args.cp):
                out = subprocess.run([sys.executable, __file__, "--rank-of", url, "--rank", str(r), "--cp", str(args.cp)],
                                     capture_output=True, text=True, env=dict(os.environ), check=True)
                ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = {"samples": n, "images": n * args.images, "write_s": written, "index_s": index_s,
                   "first_batch_s": max(r["first_batch_s"] for r in ranks),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks)}
            row |= steady_state(url, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print("| samples | images | index (s) | first batch per rank (s) | peak RSS per rank (MiB) | "
              "step, prebuilt batch (s) | step, streamed with prefetch (s) | step, read then step (s) | "
              "batch read alone (s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['samples']} | {r['images']} | {r['index_s']:.1f} | {r['first_batch_s']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['step_prebuilt_s']:.3f} | {r['step_streamed_s']:.3f} | "
                  f"{r['step_serial_s']:.3f} | {r['batch_read_s']:.3f} |")
    finally:
        svc.down()


if __name__ == "__main__":
    main()
