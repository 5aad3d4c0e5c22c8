"""Data-set scale (issue 23): what a maps-stage chunk costs beside its RIB steps, as the data set grows.

For synthetic data sets of ``--sizes`` VOC-size (500x375) JPEGs, on local disk and on moto's S3
server (started in this process, as the tests do), one child process per data set (so that sizes do
not share a peak RSS) runs what a worker runs for a pipeline's maps stage:

- reads the manifest and builds the companion pool's index (``rib_core.rib.companions.POOLS``): the
  **index build** time;
- runs ``--chunks`` chunks of ``--chunk`` images through ``rib_core.jobs.stages.maps_stage`` with a
  small RIB config (the smallest registered arch, ``--arch``), timing the whole chunk and the time
  inside ``RibRunner`` (the RIB runs). **Per-chunk overhead** = chunk wall time - RIB time: the
  classifier's lookup (loaded once per process), the registry lookup, the targets' reads, the
  maps' writes, and any companion decoding the prefetch did not hide. The first chunk is cold
  (empty cache, and for S3 an empty disk cache); the goal is on the warm one;
- times each RIB **step** with the prefetch on (the chunks before the last) and off (the last chunk:
  companions read and decoded inline);
- reports its **peak RSS** (``VmHWM``), with the cache bound and what the cache held.

Generating 100k distinct images would take longer than the measurement: ``--distinct`` JPEGs are
encoded once and written under many names (every file a real copy, read through the page cache).

From the measured figures and ``bench_rib``'s FLOP model (``rib_flops``: FlopCounterMode on real
runs), the **projected** wall time of VOC train_aug's maps stage (10,582 images) at the paper's
settings: on this CPU (the achieved FLOP/s of the chunks' RIB runs) and on one H100 (an assumed
fraction of its bf16 dense peak, ``--h100-tflops`` x ``--h100-fraction``; not measured here),
both plus the per-image overhead measured here.

The submit latency of a bulk job and a pipeline of the largest size (the API's part of issue 23)
is :mod:`benchmarks.bench_submit`'s measurement, run here with ``--submit`` (or on its own).

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_scale --sizes 1000 10000 --out scale.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rib_core.data.classes import VOC_CLASSES
from rib_core.data.datasets import MANIFEST_FORMAT, MANIFEST_VERSION
from rib_core.runtime.provenance import cpu_name, run_record

VOC_SIZE = (500, 375)  # width, height
BUCKET = "bench-scale"


def distinct_jpegs(count: int, seed: int) -> list[bytes]:
    """``count`` VOC-size JPEGs of smooth random scenes (a photo's size on disk, not noise's)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        scene = np.asarray(coarse.resize(VOC_SIZE, Image.BICUBIC)).astype(np.int16)
        scene = np.clip(scene + rng.integers(-12, 13, scene.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(scene).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def manifest_lines(size: int, image: Callable[[int], str], seed: int) -> str:
    """A manifest of ``size`` images with one to three VOC classes each."""
    rng = np.random.default_rng(seed)
    header = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": list(VOC_CLASSES)}
    rows = [json.dumps(header)]
    for n in range(size):
        labels = rng.choice(len(VOC_CLASSES), size=int(rng.integers(1, 4)), replace=False)
        rows.append(json.dumps({"id": f"img{n:07d}", "image": image(n), "labels": [VOC_CLASSES[c] for c in labels]}))
    return "\n".join(rows) + "\n"


def local_dataset(root: Path, size: int, jpegs: list[bytes]) -> str:
    (root / "images").mkdir(parents=True)
    for n in range(size):
        (root / "images" / f"img{n:07d}.jpg").write_bytes(jpegs[n % len(jpegs)])
    (root / "manifest.jsonl").write_text(manifest_lines(size, lambda n: f"images/img{n:07d}.jpg", seed=size))
    return str(root / "manifest.jsonl")


def s3_dataset(client: Any, prefix: str, size: int, jpegs: list[bytes]) -> str:
    def put(n: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/img{n:07d}.jpg", Body=jpegs[n % len(jpegs)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(size)))
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.jsonl",
                      Body=manifest_lines(size, lambda n: f"images/img{n:07d}.jpg", seed=size).encode())
    return f"s3://{BUCKET}/{prefix}/manifest.jsonl"


def rib_config(args: argparse.Namespace) -> Any:
    from rib_core.config.rib_config import RibConfig

    return RibConfig(iterations=args.iterations, companions=args.companions, crop_size=args.crop,
                     resize_long=(int(args.crop * 0.625), int(args.crop * 1.25)), map_scales=(1.0,),
                     loss_scales=(1.0,), margin=1e12, explode_ratio=1.0, engine="plain", precision="fp32")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One data set in a fresh process: index build, chunks, step times, peak RSS."""
    import torch

    import rib_core.rib.process as rib
    from rib_core.data.datasets import load_manifest
    from rib_core.jobs.stages import maps_stage
    from rib_core.rib.companions import POOLS
    from rib_core.training.checkpoints import load_classifier

    args = argparse.Namespace(**spec["args"])
    cfg = rib_config(args)
    load_classifier(spec["classifier"])  # the model's share of the RSS, before any pool
    rss_model = memory("VmRSS")
    started = time.perf_counter()
    manifest = load_manifest(spec["manifest"], verify_files=False)
    parsed = time.perf_counter()
    pool = POOLS.get(manifest, cache_bytes=spec["cache_bytes"], disk_cache=spec["disk_cache"])
    indexed = time.perf_counter()
    in_rib = {"seconds": 0.0, "steps": 0}
    run = rib.RibRunner._run

    def timed_run(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        outcomes = run(self, *a, **kw)
        in_rib["seconds"] += time.perf_counter() - t
        in_rib["steps"] += sum(o.steps for o in outcomes)
        return outcomes

    rib.RibRunner._run = timed_run
    chunks = []
    work = Path(spec["work"])
    for c in range(args.chunks):
        pool.prefetch = c < args.chunks - 1
        ids = [r.id for r in manifest.records[c * args.chunk:(c + 1) * args.chunk]]
        in_rib.update(seconds=0.0, steps=0)
        loading = pool.cache.load_seconds
        t = time.perf_counter()
        maps_stage(work, manifest, ids, spec["classifier"], cfg, cache_bytes=spec["cache_bytes"],
                   disk_cache=spec["disk_cache"])
        wall = time.perf_counter() - t
        chunks.append({"prefetch": pool.prefetch, "wall_s": wall, "rib_s": in_rib["seconds"],
                       "overhead_s": wall - in_rib["seconds"], "step_s": in_rib["seconds"] / max(1, in_rib["steps"]),
                       "decode_s": pool.cache.load_seconds - loading})
    return {"parse_s": parsed - started, "index_s": indexed - parsed, "chunks": chunks, "pool_builds": POOLS.builds,
            "rss_model_bytes": rss_model, "peak_rss_bytes": memory("VmHWM"),
            "cache_held_bytes": pool.cache.nbytes, "cache_decodes": pool.cache.decodes,
            "remote_reads": pool.reader.remote_reads, "threads": torch.get_num_threads()}


def memory(field: str) -> int:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (peak) in bytes. Not ``getrusage``: its peak
    survives ``exec`` and would be the parent's (moto holds the S3 data sets in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--child", json.dumps(spec)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flop_model(args: argparse.Namespace) -> dict[str, float]:
    """FLOPs per image of this benchmark's RIB config and of the paper's (``bench_rib.rib_flops``).

    The paper's count runs ResNet-50 at 1/``--flops-scale`` of VOC's size (target and crops): a
    full-size run needs about 7 GB and most of an hour on a shared 2-core CPU. Convolutions cost in
    proportion to output pixels, so the count is scaled back by the pixel ratios; the strided sizes'
    rounding makes that approximate (a few percent)."""
    import torch

    from benchmarks.bench_rib import rib_flops, synthetic_pool
    from rib_core.config.rib_config import RibConfig
    from rib_core.rib.process import RibRunner
    from rib_core.training.networks import CamNet

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (VOC_SIZE[1], VOC_SIZE[0], 3), dtype=np.uint8)
    torch.manual_seed(0)
    ours = rib_config(args)
    small = rib_flops(RibRunner(CamNet(len(VOC_CLASSES), args.arch).eval(), synthetic_pool(
        ours.companions + 4, max(VOC_SIZE), len(VOC_CLASSES), rng)), image, [0], ours)
    paper = RibConfig(margin=1e12, explode_ratio=1.0, engine="plain", precision="fp32")  # K 10, 20 crops of 512
    s = args.flops_scale
    target = image[:: s, :: s]
    crop = paper.crop_size // s
    # Runs of 2 steps with 0 and 1 companion: FLOPs are linear in the steps and in the companions.
    runner = RibRunner(CamNet(len(VOC_CLASSES), "resnet50").eval(),
                       synthetic_pool(4, max(VOC_SIZE) // s, len(VOC_CLASSES), rng))
    two_steps = paper.model_copy(update={"iterations": 2, "companions": 0, "crop_size": crop,
                                         "resize_long": tuple(v // s for v in paper.resize_long)})
    step, two = rib_flops(runner, target, [0], two_steps)
    step_one_crop, _ = rib_flops(runner, target, [0], two_steps.model_copy(update={"companions": 1}))
    target_ratio = VOC_SIZE[0] * VOC_SIZE[1] / (target.shape[0] * target.shape[1])
    crop_ratio = (paper.crop_size / crop) ** 2
    per_crop = (step_one_crop - step) * crop_ratio
    paper_image = (two + (paper.iterations - 2) * step) * target_ratio + paper.iterations * paper.companions * per_crop
    return {"bench_flops_per_image": small[1], "paper_iterations": paper.iterations,
            "paper_flops_per_image": paper_image, "paper_counted_at_scale": 1 / s}


def projection(results: list[dict[str, Any]], flops: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """PROJECTED hours for VOC train_aug's maps stage at the paper's settings, from the largest
    local data set's warm chunks."""
    from benchmarks.bench_rib import VOC_TRAIN_AUG

    local = max((r for r in results if r["storage"] == "local"), key=lambda r: r["size"])
    warm = [c for c in local["chunks"][1:] if c["prefetch"]] or local["chunks"][:1]
    rib_per_image = float(np.mean([c["rib_s"] for c in warm])) / args.chunk
    overhead_per_image = float(np.mean([c["overhead_s"] for c in warm])) / args.chunk
    cpu_rate = flops["bench_flops_per_image"] / rib_per_image
    h100_rate = args.h100_tflops * 1e12 * args.h100_fraction
    paper = flops["paper_flops_per_image"]
    return {"images": VOC_TRAIN_AUG, "paper_tflop_per_image": paper / 1e12,
            "cpu_achieved_tflop_per_s": cpu_rate / 1e12, "overhead_s_per_image": overhead_per_image,
            "cpu_hours": VOC_TRAIN_AUG * (paper / cpu_rate + overhead_per_image) / 3600,
            "h100_assumed_tflop_per_s": h100_rate / 1e12,
            "h100_hours": VOC_TRAIN_AUG * (paper / h100_rate + overhead_per_image) / 3600}


def table(report: dict[str, Any]) -> str:
    mib = 2**20
    rows = ["| data set | index build (s) | chunk 1, cold: overhead (s) | warm chunk: overhead (s) | "
            "warm chunk: decoding, overlapped (s) | step, prefetch on (s) | step, prefetch off (s) | "
            "peak RSS (MiB) | model RSS (MiB) | cache held / bound (MiB) | S3 GETs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        on = [c for c in r["chunks"] if c["prefetch"]]
        off = [c for c in r["chunks"] if not c["prefetch"]]
        warm = on[1:] or on
        rows.append(
            f"| {r['size']:,} {r['storage']} | {r['parse_s'] + r['index_s']:.2f} | "
            f"{r['chunks'][0]['overhead_s']:.2f} | "
            f"{np.mean([c['overhead_s'] for c in warm]):.2f} | {np.mean([c['decode_s'] for c in warm]):.2f} | "
            f"{np.mean([c['step_s'] for c in warm]):.3f} | "
            + (f"{np.mean([c['step_s'] for c in off]):.3f}" if off else "-")
            + f" | {r['peak_rss_bytes'] / mib:.0f} | {r['rss_model_bytes'] / mib:.0f} | "
            f"{r['cache_held_bytes'] / mib:.0f} / {report['cache_bytes'] / mib:.0f} | "
            + (str(r["remote_reads"]) if r["storage"] == "s3" else "-") + " |")
    p = report.get("projection")
    if p:
        rows += ["", f"PROJECTED, VOC train_aug maps stage ({p['images']:,} images, paper settings: "
                 f"{p['paper_tflop_per_image']:.2f} TFLOP per image): this CPU {p['cpu_hours']:.0f} h "
                 f"({p['cpu_achieved_tflop_per_s']:.3f} TFLOP/s achieved in the chunks' RIB runs); one H100 "
                 f"{p['h100_hours']:.1f} h (assumed {p['h100_assumed_tflop_per_s']:.0f} TFLOP/s, not measured); "
                 f"both + {p['overhead_s_per_image']:.2f} s/image overhead measured here."]
    latency = json.dumps(report["submit_latency"]) if report.get("submit_latency") else "not measured (--submit)"
    rows += ["", f"Submit latency (bulk job / pipeline of 100k images): {latency}"]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--submit", action="store_true", help="also time submitting a bulk job and a pipeline of the "
                                                         "largest size (benchmarks.bench_submit)")
    p.add_argument("--storage", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    p.add_argument("--s3-max", type=int, default=10000,
                   help="largest data set also put on S3 (moto holds it in memory)")
    p.add_argument("--distinct", type=int, default=300, help="distinct JPEGs written under many names")
    p.add_argument("--cache-mib", type=int, default=64, help="the pool's cache bound (small, so that it fills)")
    p.add_argument("--chunk", type=int, default=8, help="images per chunk (the worker's chunk)")
    p.add_argument("--chunks", type=int, default=3, help="chunks per data set; the last runs without prefetch")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--iterations", type=int, default=1,
                   help="RIB steps per image (small: the RIB cost is not the point)")
    p.add_argument("--companions", type=int, default=20)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--no-paper-flops", action="store_true", help="skip the FLOP count at the paper's settings "
                   "(ResNet-50 runs of 2 steps: minutes on a CPU) and the projection")
    p.add_argument("--flops-scale", type=int, default=4, help="count the paper's FLOPs at 1/N of VOC's size")
    p.add_argument("--flops", help="a JSON of flop_model's figures from an earlier run, instead of counting again")
    p.add_argument("--h100-tflops", type=float, default=989.0, help="H100 SXM bf16 dense peak (datasheet)")
    p.add_argument("--h100-fraction", type=float, default=0.3, help="assumed fraction of that peak RIB achieves")
    p.add_argument("--work", default=None, help="folder for the generated data (default: a temporary one, deleted)")
    p.add_argument("--out", default="bench_scale.json")
    p.add_argument("--from-json", nargs="+", help="print the table (and the projection, with --flops) of earlier "
                   "runs' JSON files, measuring nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        report = {**runs[0], "results": [r for run in runs for r in run["results"]]}
        if args.flops:
            report["flops"] = json.loads(Path(args.flops).read_text())
            report["projection"] = projection(report["results"], report["flops"], args)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(table(report))
        return

    from rib_core.training.checkpoints import save_classifier
    from rib_core.training.networks import CamNet
    from tests.service_stack import moto_s3, s3

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jpegs = distinct_jpegs(args.distinct, seed=0)
    classifier = work / "classifier.pth"
    save_classifier(CamNet(len(VOC_CLASSES), args.arch), VOC_CLASSES, classifier)
    spec_args = {k: v for k, v in vars(args).items() if k != "child"}
    cache_bytes = args.cache_mib * 2**20
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "run": run_record(), "date": datetime.now(UTC).isoformat(timespec="minutes"), "machine": cpu_name(),
        "cores": len(os.sched_getaffinity(0)), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cache_bytes": cache_bytes, "config": spec_args,
        "data": f"{args.distinct} distinct {VOC_SIZE[0]}x{VOC_SIZE[1]} JPEGs written under many names "
                f"(mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB)",
        "results": results, "submit_latency": [],
    }
    try:
        with moto_s3() as endpoint:
            env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            client = s3(endpoint)
            client.create_bucket(Bucket=BUCKET)
            for size in args.sizes:
                for storage in args.storage:
                    if storage == "s3" and size > args.s3_max:
                        continue
                    t = time.perf_counter()
                    manifest = (local_dataset(work / f"local-{size}", size, jpegs) if storage == "local"
                                else s3_dataset(client, f"s3-{size}", size, jpegs))
                    made = time.perf_counter() - t
                    spec = {"args": spec_args, "manifest": manifest, "classifier": str(classifier),
                            "cache_bytes": cache_bytes, "work": str(work / f"out-{storage}-{size}"),
                            "disk_cache": str(work / f"disk-{size}") if storage == "s3" else None}
                    result = {"size": size, "storage": storage, "generate_s": made, **run_child(spec, env)}
                    print(f"{size} {storage}: {json.dumps(result)}", file=sys.stderr, flush=True)
                    results.append(result)
                    Path(args.out).write_text(json.dumps(report, indent=2))  # so far
                    if storage == "local":
                        shutil.rmtree(work / f"local-{size}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.submit:
        from benchmarks.bench_submit import run as submit_latency

        report["submit_latency"] = submit_latency([max(args.sizes)], repeats=3)["rows"]
    if args.flops or not args.no_paper_flops:
        flops = json.loads(Path(args.flops).read_text()) if args.flops else flop_model(args)
        report["flops"] = flops
        report["projection"] = projection(results, flops, args)
    report["bench_seconds"] = time.perf_counter() - started
    report["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # the run record has the one at the start
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{report['date']}, {report['machine']}, {report['cores']} cores, OMP_NUM_THREADS="
          f"{report['omp_num_threads']}; {report['data']}; cache bound {args.cache_mib} MiB; "
          f"{args.chunk}-image chunks, {args.arch}, K {args.iterations}, {args.companions} companions of "
          f"{args.crop} px\n")
    print(table(report))


if __name__ == "__main__":
    main()
