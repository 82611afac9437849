"""Time and peak memory of `batch` reading and merging a folder's records (issue 24, item 6).

    python examples/benchmark_batch_records.py --records 300000 --root /path/to/old/checkout --root .

Builds a folder of N synthetic records as `batch` leaves them after a crash (the first half merged
in manifest.jsonl, the rest in two ranks' part files, batches of 8 alternating), then, for each
checkout given, runs each step in a fresh process, on its own copy of the folder: the planning of
a rerun (Job.plan: every record read and checked), the merge (Job.merge) and the summary (which
reads the merged manifest). Prints a table: seconds, and peak RSS (ru_maxrss) against the RSS of
the same process once the job is built (its images and the imports: what any run holds anyway).
The merged manifests of every checkout are compared byte for byte.
"""

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPTIONS = {"model": "/models/tiny-shapes", "steps": 25, "guidance_scale": 7.5, "scheduler": None, "height": None,
           "width": None, "batch_size": 8, "num_images": 1, "dtype": None, "variant": None, "revision": None,
           "lora": None, "negative": None, "seed": 0, "device": "cpu", "threads": 1, "compile": False,
           "deepcache_interval": None, "prediction_type": None}
BATCH = 8

CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from mini_tgate.cli import jobs
folder, n, step, options = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
lines = [jobs.Line(k + 1, f"a red circle on a blue background, {k}") for k in range(n)]
job = jobs.Job(jobs.job_images(lines, 1, 0), {"": (folder, None)}, options, options["batch_size"])
job.batches
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, start = rss(), time.perf_counter()
if step == "plan":
    assert len(job.plan()) == len(job.batches)  # no PNGs: every batch to do
elif step == "merge":
    job.merge()
else:
    jobs.summary(job, {"images": [0], "busy": [0.0], "wall": 0.0}, n)
print(json.dumps({"seconds": time.perf_counter() - start, "peak": rss(), "job": before}))
"""


def record(k: int, options: dict) -> str:
    """A record as make_batch writes it."""
    prompt = f"a red circle on a blue background, {k}"
    parameters = {"steps": 25, "guidance_scale": 7.5, "sampler": "DDIM", "scheduler": "DDIMScheduler",
                  "schedule_type": "Automatic", "model": "tiny-shapes", "model_hash": "0123456789",
                  "model_revision": None, "dtype": "torch.float32", "prompt": prompt, "seed": k, "batch_size": BATCH,
                  "batch_pos": k % BATCH, "tgate": None, "width": 64, "height": 64, "id": f"{k:05d}",
                  "batch_options": "0123456789abcdef"}
    return json.dumps({"id": f"{k:05d}", "file": f"{k:05d}.png", "line": k + 1, "prompt": prompt,
                       "negative_prompt": None, "seed": k, "parameters": parameters, "options": options,
                       "rank": k // BATCH % 2, "seconds": {"text": 0.001, "denoise": 0.1, "decode": 0.01},
                       "denoiser_macs": 1264000000,
                       "denoiser_macs_no_gate": 1264000000}, ensure_ascii=False) + "\n"


def build(folder: Path, n: int) -> None:
    options = dict(sorted({**OPTIONS, "tgate": None}.items()))  # as Job.folder_options gives them
    folder.mkdir()
    with open(folder / "manifest.jsonl", "w") as manifest, open(folder / ".manifest-0000000a.jsonl", "w") as a, \
            open(folder / ".manifest-0000000b.jsonl", "w") as b:
        for k in range(n):
            (manifest if k < n // 2 else (a, b)[k // BATCH % 2]).write(record(k, options))


def run(root: Path, folder: Path, n: int, step: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(folder), str(n), step, json.dumps(OPTIONS)],
                         capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=300_000)
    p.add_argument("--root", type=Path, action="append", required=True, help="a checkout of mini_tgate (repeat)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        build(pristine, args.records)
        size = sum(f.stat().st_size for f in pristine.iterdir())
        print(f"{args.records:,} records, {size / 2**20:.0f} MiB on disk\n")
        print("| checkout | step | seconds | peak RSS | RSS of the job alone | peak - job |")
        print("|---|---|---|---|---|---|")
        merged = []
        for root in args.root:
            copy = Path(tmp) / "copy"
            shutil.copytree(pristine, copy)
            for step in ("plan", "merge", "summary"):  # summary reads the merged manifest
                r = run(root.resolve(), copy, args.records, step)
                mib = {k: f"{v / 2**20:.0f} MiB" for k, v in r.items()}
                print(f"| {root} | {step} | {r['seconds']:.1f} | {mib['peak']} | {mib['job']} | "
                      f"{(r['peak'] - r['job']) / 2**20:.0f} MiB |", flush=True)
            merged.append(Path(tmp) / f"manifest-{len(merged)}.jsonl")
            (copy / "manifest.jsonl").rename(merged[-1])
            shutil.rmtree(copy)
        same = all(filecmp.cmp(merged[0], m, shallow=False) for m in merged[1:])
        print(f"\nmerged manifests byte-identical across checkouts: {same}")


if __name__ == "__main__":
    main()
