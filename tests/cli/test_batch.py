"""`python -m mini_tgate batch` (mini_tgate/cli/batch.py, cli/jobs.py): the same files from one process or two
(torchrun, gloo), a killed rank then a rerun, resumed runs that redo only what is missing, the
--compare-tgate summary against Pillow's reading of the files, and the bad-input errors."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import mini_tgate
from mini_tgate.cli import jobs as batch
from mini_tgate.cli import main

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import shapes  # noqa: E402

MODEL = ROOT / "weights" / "tiny-shapes"
PROMPTS = [shapes.caption(c, s, b) for c, s, b in [
    ("red", "circle", "blue"), ("yellow", "square", "black"), ("white", "triangle", "green"),
    ("cyan", "circle", "magenta"), ("blue", "square", "yellow"), ("magenta", "triangle", "white"),
    ("green", "circle", "red"), ("black", "square", "cyan"), ("red", "triangle", "yellow"),
    ("white", "circle", "black")]]
# 4 steps gated at step 2: both phases run. Batches of 3 over 10 images: [0-2] [3-5] [6-8] [9],
# and a batch's composition changes its images' bits on this CPU (7 of 12288 bytes of an image
# made beside another rather than alone), so a shard that regrouped them would show.
OPTIONS = ["--steps", "4", "--batch-size", "3", "--seed", "7", "--gate-step", "2", "--sp-interval", "1",
           "--warm-up", "0", "--model", str(MODEL)]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
ENV.pop("WORLD_SIZE", None)
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs set 1 thread, as batch does; restored after


def cli(*args, processes=None, script=None, cwd=None):
    """`python -m mini_tgate ARGS`, or under torchrun (python -m torch.distributed.run) with
    `processes` ranks on gloo; `script` runs in place of the package (a wrapper that injects a fault)."""
    run = [script] if script else ["-m", "mini_tgate"]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
              if processes else [sys.executable])
    # a session of its own, so that a timeout kills torchrun's workers too
    p = subprocess.Popen(launch + run + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def leftovers(folder: Path) -> list[str]:
    """Files a finished job must not leave: temporary PNGs and manifests, part files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:5]) + "\n\n" + "\n".join(PROMPTS[5:]) + "\n")  # a blank line is skipped
    return path


@pytest.fixture(scope="module")
def single(prompt_file, tmp_path_factory):
    """The reference: one plain process."""
    out = tmp_path_factory.mktemp("single")
    r = cli("batch", prompt_file, "--out", out, *OPTIONS)
    assert r.returncode == 0, r.stderr
    return out


def test_single_process_files_and_manifest(single, pipe):
    files = pngs(single)
    assert sorted(files) == [f"{i:05d}.png" for i in range(10)]
    records = manifest(single)
    assert [r["id"] for r in records] == [f"{i:05d}" for i in range(10)]
    assert [r["prompt"] for r in records] == PROMPTS and [r["seed"] for r in records] == list(range(7, 17))
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert [r["parameters"]["batch_pos"] for r in records] == [0, 1, 2] * 3 + [0]
    assert leftovers(single) == []
    macs = mini_tgate.count_macs(pipe.unet.config, 64, 64, 4, 7.5, mini_tgate.TGate(2, 1, 1, 0))["unet_macs"]
    assert records[0]["denoiser_macs"] == macs
    # each image is what the pipeline makes for that batch of prompts and per-image seeds
    out = pipe(PROMPTS[3:6], num_inference_steps=4, tgate=mini_tgate.TGate(2, 1, 1, 0),
               generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)]).images
    for i, image in zip((3, 4, 5), out):
        assert np.array_equal(np.asarray(PILImage.open(single / f"{i:05d}.png")), mini_tgate.formats.png.to_uint8(image))


def test_torchrun_two_processes_make_the_same_files(single, prompt_file, tmp_path):
    r = cli("batch", prompt_file, "--out", tmp_path, *OPTIONS, processes=2)
    assert r.returncode == 0, r.stderr
    assert pngs(tmp_path) == pngs(single)  # names and bytes
    records = manifest(tmp_path)
    assert [r["id"] for r in records] == [r["id"] for r in manifest(single)]  # each image once, in order
    assert {r["rank"] for r in records} == {0, 1}  # both ranks worked: batches 0, 2 on rank 0; 1, 3 on rank 1
    assert [r["rank"] for r in records] == [0] * 3 + [1] * 3 + [0] * 3 + [1]
    assert leftovers(tmp_path) == []
    assert "10 images (10 made now, 0 there already)" in r.stdout and "rank 1: 4 images" in r.stdout
    assert "10/10 images" in r.stderr  # rank 0's progress counted rank 1's images too


KILL_RANK_1 = """
import os, signal, sys
import mini_tgate.cli.jobs as batch
from mini_tgate.__main__ import main

real, calls = batch.save_png, []

def save_png(path, *args, **kwargs):
    # rank 1 dies in the middle of writing the first image of its second batch: a temporary file
    # half-written, the process killed (no exception handler runs, nothing is flushed)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        (path.parent / f".{path.name}.deadbeef.tmp").write_bytes(b"\\x89PNG half")
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(path)
    return real(path, *args, **kwargs)

batch.save_png = save_png
sys.exit(main(sys.argv[1:]))
"""


def test_killed_rank_then_rerun_completes_without_duplicates(single, prompt_file, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "out"
    r = cli("batch", prompt_file, "--out", out, *OPTIONS, processes=2, script=script)
    assert r.returncode != 0
    made = pngs(out)
    assert 3 <= len(made) < 10 and not (out / "manifest.jsonl").exists()  # the merge never ran
    assert ".00009.png.deadbeef.tmp" in leftovers(out)
    # the rerun, on one process this time: only the batches not done, the files as one clean run's
    r = cli("batch", prompt_file, "--out", out, *OPTIONS)
    assert r.returncode == 0, r.stderr
    now, there = map(int, re.search(r"\((\d+) made now, (\d+) there already\)", r.stdout).groups())
    assert now + there == 10 and 3 <= there <= len(made)  # a PNG without its record is in a batch made again
    assert pngs(out) == pngs(single)
    assert [r["id"] for r in manifest(out)] == [r["id"] for r in manifest(single)]
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- in one process

@pytest.fixture(scope="module")
def pipe(one_thread):
    return mini_tgate.load_pipeline(MODEL)


def make_job(folder, n=10, batch_size=3, gate=mini_tgate.TGate(2, 1, 1, 0)):
    lines = [batch.Line(i + 1, p) for i, p in enumerate(PROMPTS[:n])]
    return batch.Job(batch.job_images(lines, 1, 0), {"": (folder, gate)}, {"steps": 4}, batch_size)


class Counting:
    """The pipeline, counting its UNet's calls, and raising on call number `fail_at` (from 0)."""

    def __init__(self, pipe, fail_at=None):
        self.pipe, self.fail_at, self.calls, self.unet_calls = pipe, fail_at, 0, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        self.calls += 1
        hook = self.pipe.unet.register_forward_hook(lambda *_: setattr(self, "unet_calls", self.unet_calls + 1))
        try:
            return self.pipe(*args, **kwargs)
        finally:
            hook.remove()


def test_resumed_run_makes_only_the_missing_batches(pipe, tmp_path):
    job, call = make_job(tmp_path), dict(num_inference_steps=4)
    assert job.plan() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="injected"):
        batch.run_batches(job, Counting(pipe, fail_at=2), [0, 1, 2, 3], call, {})
    assert job.plan() == [2, 3]  # two batches were done: PNGs and records (in a part file)
    first = {p.name: p.stat().st_ino for p in tmp_path.glob("*.png")}
    assert len(first) == 6
    counting = Counting(pipe)
    batch.run_batches(job, counting, job.plan(), call, {})
    assert counting.unet_calls == 2 * 4  # 2 batches x 4 steps (CFG runs both halves in one call)
    # a PNG there without its record (a crash between the two): its batch is made again, the file kept
    job.merge()
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    assert job.plan() == [1]
    kept = (tmp_path / "00004.png").stat()
    counting = Counting(pipe)
    batch.run_batches(job, counting, job.plan(), call, {})
    assert counting.unet_calls == 4 and job.plan() == []
    assert (tmp_path / "00004.png").stat().st_ino == kept.st_ino and (tmp_path / "00004.png").stat().st_mtime_ns == kept.st_mtime_ns
    assert all((tmp_path / name).stat().st_ino == ino for name, ino in first.items())  # never rewritten
    job.merge()
    assert [r["id"] for r in manifest(tmp_path)] == [f"{i:05d}" for i in range(10)]
    assert leftovers(tmp_path) == []


def test_a_finished_job_loads_nothing(prompt_file, single, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(mini_tgate.cli.batch, "load_from_options", fail)
    assert main(["batch", str(prompt_file), "--out", str(single), *OPTIONS]) == 0
    assert "10 images (0 made now, 10 there already)" in capsys.readouterr().out


def test_compare_tgate(pipe, prompt_file, tmp_path, capsys):
    args = ["batch", str(prompt_file), "--steps", "4", "--batch-size", "2", *OPTIONS[4:]]
    assert main(args + ["--out", str(tmp_path / "both"), "--compare-tgate"]) == 0
    printed = capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "plain"), "--no-tgate"]) == 0
    plain, gated = tmp_path / "both" / "no-tgate", tmp_path / "both" / "tgate"
    assert pngs(plain) == pngs(tmp_path / "plain")  # the no-gate half is a plain run, bit for bit
    pixels = {folder: [np.asarray(PILImage.open(folder / f"{i:05d}.png")).astype(np.int16) for i in range(10)]
              for folder in (plain, gated)}
    diffs = [np.abs(a - b).mean() for a, b in zip(pixels[plain], pixels[gated])]
    assert 0 < np.mean(diffs)
    assert [r["mean_abs_diff_to_no_tgate"] for r in manifest(gated)] == pytest.approx(diffs, abs=1e-9)
    assert f"TGATE vs no gate: {np.mean(diffs):.2f} (0-255)" in printed
    for folder, name in ((plain, "no-tgate"), (gated, "tgate")):
        grades = [shapes.check(im.astype(np.uint8), p) for im, p in zip(pixels[folder], PROMPTS)]
        assert [r["adherence"] for r in manifest(folder)] == grades
        assert f"shapes checker, {name}: color {np.mean([g['color'] for g in grades]):.1%}" in printed
    base, gate = (mini_tgate.count_macs(pipe.unet.config, 64, 64, 4, 7.5, g)["unet_macs"]
                  for g in (None, mini_tgate.TGate(2, 1, 1, 0)))
    assert f"{gate / 1e9:.3f} G with TGATE" in printed and f"{base / 1e9:.3f} G without" in printed


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, text, message", [
    ("empty.txt", "", "holds no prompt"),
    ("blank.txt", "\n  \n\n", "holds no prompt"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n', "p.jsonl line 3: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n["a"]\n', "line 2: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a", "negative_prompt": "b"}\n', "line 1: unknown key(s) 'negative_prompt'"),
    ("p.jsonl", '{"negative": "b"}\n', "line 1: \"prompt\" must be given"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', "line 1: \"seed\" must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": true}\n', "line 1: \"seed\" must be an integer"),
    ("p.jsonl", '{"prompt": "a", "id": "../x"}\n', "line 1: \"id\" must be"),
    ("p.jsonl", '{"prompt": "a", "id": ".hidden"}\n', "line 1: \"id\" must be"),
    ("p.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "X"}\n', "line 2: image id 'X' is also line 1's"),
    ("p.txt", "a\n" + "b" * 2001 + "\n", "p.txt line 2: the prompt has 2001 characters"),
])
def test_malformed_prompt_files(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["batch", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_prompt_file_bounds_and_encoding(tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\na \xff dog\n")
    with pytest.raises(ValueError, match=r"p.txt line 2: not UTF-8 text \(byte 0xff at column 3\)"):
        batch.read_prompts(path)
    monkeypatch.setattr(batch, "BATCH_MAX_PROMPT_FILE", 8)
    with pytest.raises(ValueError, match="larger than"):
        batch.read_prompts(path)
    with pytest.raises(ValueError, match="not a regular file"):
        batch.read_prompts(tmp_path)
    lines = [batch.Line(1, "a")] * 2
    monkeypatch.setattr(batch, "BATCH_MAX_IMAGES", 5)
    with pytest.raises(ValueError, match="--num-images 3: from 1 to 2"):
        batch.job_images(lines, 3, 0)


def test_argument_errors(tmp_path, prompt_file, capsys):
    (tmp_path / "file").write_text("")
    for args, message in [
        (["--out", str(tmp_path / "file" / "sub")], "is not a writable folder"),
        (["--out", str(tmp_path / "x.png")], "batch writes into a folder"),
        (["--out", str(tmp_path / "o"), "--compare-tgate", "--no-tgate"], "drop --no-tgate"),
        (["--out", str(tmp_path / "o"), "--overwrite"], "never replaces an image"),
        (["--out", str(tmp_path / "o"), "--compare"], "--compare-tgate"),
        (["--out", str(tmp_path / "o"), "--negative", "a", "--negative", "b"], "one --negative"),
        (["--out", str(tmp_path / "o"), "--threads", "0"], "--threads 0"),
        (["--out", str(tmp_path / "o"), "--steps", "0"], "--steps 0"),
    ]:
        assert main(["batch", str(prompt_file), *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)


def test_more_processes_than_prompts(tmp_path, capsys, monkeypatch):
    path = tmp_path / "one.txt"
    path.write_text("a red circle on a blue background\n")
    monkeypatch.setattr(batch, "distributed", lambda: (0, 2))  # rank 0 of 2: refused before any message is sent
    assert main(["batch", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "error: 2 processes for 1 prompt(s): start at most 1" in capsys.readouterr().err


def test_rerun_with_other_options_or_prompts_is_refused(single, prompt_file, tmp_path, capsys):
    other = [a if a != "4" else "5" for a in OPTIONS]  # --steps 5
    assert main(["batch", str(prompt_file), "--out", str(single), *other, "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "holds images made with other options: --batch-size 3 (now 2), --steps 4 (now 5)" in err
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join(PROMPTS[:5]) + "\n\n" + "\n".join([PROMPTS[5], "a cat"] + PROMPTS[7:]) + "\n")
    assert main(["batch", str(changed), "--out", str(single), *OPTIONS]) == 1
    assert "line 8 of the prompt file changed since" in capsys.readouterr().err
    # a file in the way that this job did not make is never replaced
    out = tmp_path / "out"
    out.mkdir()
    mini_tgate.formats.png.save_png(out / "00001.png", np.zeros((8, 8, 3), np.uint8))
    (out / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["batch", str(prompt_file), "--out", str(out), *OPTIONS]) == 1
    assert "00001.png' is in the way of an image of this job and was not made by it" in capsys.readouterr().err
    (out / "00001.png").unlink()
    assert main(["batch", str(prompt_file), "--out", str(out), *OPTIONS]) == 1
    assert "00002.png' is in the way of an image of this job and is not a readable PNG" in capsys.readouterr().err


def test_random_seed_is_kept_for_reruns(tmp_path):
    """--seed -1 draws a base seed once; a rerun into the same folder takes it from the records."""
    assert batch.resolve_seed([tmp_path], 5) == 5
    drawn = {batch.resolve_seed([tmp_path], -1) for _ in range(4)}
    assert len(drawn) > 1 and all(0 <= s < 2**32 for s in drawn)
    (tmp_path / ".manifest-0123abcd.jsonl").write_text(json.dumps({"id": "00000", "options": {"seed": 1234}}) + "\n")
    assert batch.resolve_seed([tmp_path / "missing", tmp_path], -1) == 1234
    assert batch.resolve_seed([tmp_path], 9) == 9  # a seed given is the seed (a mismatch is refused by plan())


def test_part_files_cut_short_by_a_crash(tmp_path):
    """A record a crash cut short (no newline yet) is dropped: its image is made again. Any other
    line that is not a record stops the job instead of being guessed at."""
    part = tmp_path / ".manifest-0123abcd.jsonl"
    part.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
    assert [r["id"] for r in batch.read_records(part)] == ["a", "b"]
    part.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="line 2 is not a record of this command"):
        list(batch.read_records(part))
    part.write_text('{"id": "a"}\n')
    (tmp_path / ".manifest-notours.jsonl").write_text("whatever\n")  # not a part file's name: not read
    assert [r["id"] for r in batch.folder_records(tmp_path)] == ["a"]
