"""Object storage: read throughput of loading a level from S3 vs the local disk (issue 13 item 4).

    python bench/bench_s3.py [--store PATH] [--split train] [--levels fc,pooled] [--repeats 7]

The store (default: the test suite's tiny store, built once under ``runs/bench/s3/`` from the tiny
benchmark and detector of ``tests/pipeline_fixtures.py``, ~30 s) is uploaded to an S3 server
started here — moto's server in its own process on 127.0.0.1, fake credentials — and then
``SplitStore.load(level=...)`` runs side by side on the local copy and on ``s3://bench/store.zarr``
(interleaved, order rotated, medians over repeats; one warm-up each). The local side reads from
the page cache (warm) with roicache's direct chunk reader; the S3 side goes through zarr and s3fs,
one HTTP request per object. Both sides are checked to load equal RoIs.

Figures: decoded MB (the RoiSet's tensors: features plus every RoI column), stored MB (the objects
of the split's ``feat/<level>``, ``rois/*`` and ``images/*`` arrays), objects, seconds, MB/s of
each, and the time ratio s3/local. No assertion on timing: moto is a Python server on the same
2 shared cores, so this is a lower bound on what a real S3 endpoint gives per request, and the
tiny store's objects are small (latency-bound, not bandwidth-bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)

KEY, SECRET, REGION, BUCKET = "bench", "bench", "us-east-1", "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a child process (so serving requests does not take this process's GIL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("error: moto's server did not start within 60 s; is moto[server] installed (pip install -e '.[dev]')?")


def _tiny_store(root: Path) -> Path:
    """The tests' tiny store, built once (reused when a complete one is there)."""
    from cache_schema import open_store
    from cache_schema.errors import SchemaError
    from tests.pipeline_fixtures import build_data, build_detector, build_store

    store = root / "store.zarr"
    try:
        if open_store(store).is_complete:
            return store
    except SchemaError:
        pass
    data = root / "data" if (root / "data" / "train.json").is_file() else build_data(root)
    ckpt = build_detector(data, root)
    return build_store(ckpt, data, store, overwrite=True)


def _stored(store: Path, split: str, level: str) -> tuple[int, int]:
    """(bytes, objects) of the arrays ``load(level=...)`` reads (features of the level, RoI columns,
    image tables), counted on the local copy."""
    files = [p for sub in (f"feat/{level}", "rois", "images") for p in (store / split / sub).rglob("*")
             if p.is_file() and p.name != "zarr.json"]
    return sum(p.stat().st_size for p in files), len(files)


def _decoded_bytes(roiset) -> int:
    import torch

    return sum(t.element_size() * t.nelement() for f in dataclasses.fields(roiset)
               if isinstance(t := getattr(roiset, f.name), torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="a local store (default: the tiny store, built once)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--levels", default="fc,pooled")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    store = args.store or _tiny_store(C.BENCH_OUT / "s3")
    proc, endpoint = _start_moto()
    try:
        # What a user sets; botocore reads these whenever s3fs makes a client.
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION,
                          AWS_ENDPOINT_URL_S3=endpoint, AWS_EC2_METADATA_DISABLED="true")
        import s3fs
        import torch

        from cache_schema import open_store

        torch.set_num_threads(1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        t0 = time.perf_counter()
        fs.put(str(store), f"{BUCKET}/store.zarr", recursive=True)
        upload_s = time.perf_counter() - t0
        url = f"s3://{BUCKET}/store.zarr"
        local, remote = open_store(store).split(args.split), open_store(url).split(args.split)

        rows = []
        timings = []
        for level in [lv.strip() for lv in args.levels.split(",") if lv.strip()]:
            a, b = local.load(level=level), remote.load(level=level)
            for f in dataclasses.fields(a):
                x, y = getattr(a, f.name), getattr(b, f.name)
                if isinstance(x, torch.Tensor) and not torch.equal(x, y):
                    raise SystemExit(f"error: {f.name} of level {level} differs between the local and the S3 copy")
            decoded = _decoded_bytes(a)
            stored, objects = _stored(store, args.split, level)
            t = C.interleave({"local": lambda lv=level: local.load(level=lv),
                              "s3": lambda lv=level: remote.load(level=lv)}, repeats=args.repeats)
            timings.append(t)
            loc, s3 = t.median("local"), t.median("s3")
            mb = 1e6
            rows.append([level, decoded / mb, stored / mb, objects, loc, s3, decoded / mb / loc, decoded / mb / s3,
                         stored / mb / loc, stored / mb / s3, t.median_ratio("s3", "local")])
        text = "\n\n".join([
            C.header("S3 (moto server) vs local: loading one level", extra={
                "store": f"{store} ({args.split}: {local.num_images} images, stride {local.stride})",
                "s3": f"{url} on moto's server at {endpoint} (child process), upload {upload_s:.1f} s",
                "repeats": f"{args.repeats}, interleaved, order rotated, 1 torch thread"}),
            C.table(["level", "decoded MB", "stored MB", "objects", "local s", "s3 s", "local MB/s (decoded)",
                     "s3 MB/s (decoded)", "local MB/s (stored)", "s3 MB/s (stored)", "time s3/local"], rows),
            "\n".join(C.load_line(t) for t in timings[:1]),
        ])
        C.emit(text, C.BENCH_OUT / "bench_s3.md")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
