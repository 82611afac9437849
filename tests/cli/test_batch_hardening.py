"""`batch` against a careless or hostile user (issue 24): two runs into one folder at once, a
byte-order mark in a prompt file, FIFOs and other non-regular files in the output folder, and the
memory of reading a folder's records."""

import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import tracemalloc

import pytest
from test_batch import ENV, OPTIONS, PROMPTS, ROOT, leftovers, manifest

from mini_tgate.cli import jobs, main

pytestmark = pytest.mark.usefixtures("one_thread")
LOCK = ".batch.lock"  # jobs.LOCK

# a batch run that stops in its first image's write until the test closes its stdin
HOLD = """
import sys
import mini_tgate.cli.jobs as jobs
from mini_tgate.__main__ import main

real = jobs.save_png

def save_png(*args, **kwargs):
    jobs.save_png = real
    print("writing", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)

jobs.save_png = save_png
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n")
    return path


def start(*args, script=None):
    """`python -m mini_tgate ARGS` (or `script` ARGS) started, in a session of its own."""
    run = [str(script)] if script else ["-m", "mini_tgate"]
    return subprocess.Popen([sys.executable, *run, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True)


def held(prompts, out):
    """A batch run into `out` stopped while it writes its first image (it holds the folder)."""
    script = prompts.parent / "hold.py"
    script.write_text(HOLD)
    p = start("batch", prompts, "--out", out, *OPTIONS, script=script)
    if p.stdout.readline() != "writing\n":
        p.kill()
        pytest.fail(f"the holding run ended: {p.communicate()}")
    return p


def test_one_job_a_folder(prompts, tmp_path, capsys):
    """A second run into a folder in use is refused, naming the process that holds it; the first
    ends as if alone. A run killed (SIGKILL: no cleanup) leaves its lock file, which blocks nothing."""
    out = tmp_path / "out"
    p = held(prompts, out)
    try:
        assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {str(out)!r} is in use by another batch job (pid {p.pid} on "
                              f"{socket.gethostname()}, started ") and err.count("\n") == 1, err
    finally:
        stdout, stderr = p.communicate("go on\n", timeout=300)
    assert p.returncode == 0 and "done: 2 images (2 made now, 0 there already)" in stdout, stderr
    assert [r["id"] for r in manifest(out)] == ["00000", "00001"] and leftovers(out) == []

    out = tmp_path / "killed"
    p = held(prompts, out)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert (out / LOCK).exists()
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 0
    assert "done: 2 images (2 made now, 0 there already)" in capsys.readouterr().out
    assert leftovers(out) == []


def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    """Notepad starts a UTF-8 file with U+FEFF: it is dropped, from text and JSONL prompt files alike."""
    (tmp_path / "p.txt").write_bytes(codecs.BOM_UTF8 + f"{PROMPTS[0]}\r\n{PROMPTS[1]}\r\n".encode())
    assert [line.prompt for line in jobs.read_prompts(tmp_path / "p.txt")] == PROMPTS[:2]
    (tmp_path / "p.jsonl").write_bytes(codecs.BOM_UTF8 + json.dumps({"prompt": PROMPTS[0]}).encode() + b"\n")
    assert [line.prompt for line in jobs.read_prompts(tmp_path / "p.jsonl")] == PROMPTS[:1]


@pytest.mark.parametrize("name, make, kind", [
    ("manifest.jsonl", os.mkfifo, "a FIFO"),
    ("manifest.jsonl", os.mkdir, "a folder"),
    (LOCK, os.mkfifo, "a FIFO"),
    (LOCK, lambda path: path.symlink_to(path.parent.parent / "mine.txt"), "a symbolic link"),  # to a user's file
])
def test_non_regular_files_in_the_folder_are_refused(prompts, tmp_path, capsys, name, make, kind):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "mine.txt").write_text("mine\n")
    make(out / name)
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 1
    err = capsys.readouterr().err
    assert f"error: {str(out / name)!r} is {kind}, not a regular file" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == [name] and (tmp_path / "mine.txt").read_text() == "mine\n"


def test_a_fifo_named_like_a_part_file_is_refused_not_waited_on(prompts, tmp_path):
    """Reading it would wait for a writer forever (the timeout only turns such a hang into a failure)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".manifest-0123abcd.jsonl")
    p = start("batch", prompts, "--out", out, *OPTIONS)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("batch waited on the FIFO")
    assert p.returncode == 1 and f"{str(out / '.manifest-0123abcd.jsonl')!r} is a FIFO, not a regular file" in err


def test_a_file_in_the_way_of_the_lock_file_is_kept(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("my notes\n")
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 1
    assert "is in the way of batch's lock file and is not one" in capsys.readouterr().err
    assert (out / LOCK).read_text() == "my notes\n"


def test_records_are_read_one_at_a_time(tmp_path):
    """Planning, merging and summing up hold one record at a time, not the folder's: 16 MB of
    records (128 of 128 KB), in a manifest and a part file out of order, and no step allocates
    2 MB. The merged manifest has the job's images in order, then an image not of the job."""
    lines = [jobs.Line(i + 1, f"prompt {i}") for i in range(128)]
    job = jobs.Job(jobs.job_images(lines, 1, 0), {"": (tmp_path, None)}, {"steps": 4}, 4)
    options = job.folder_options("")
    records = [json.dumps({"id": image.id, "prompt": image.prompt, "negative_prompt": None, "seed": image.seed,
                           "options": options, "padding": "x" * (128 << 10)}) + "\n" for image in job.images]
    other = json.dumps({"id": "other", "prompt": "a cat"}) + "\n"
    (tmp_path / "manifest.jsonl").write_text("".join(records[:64]) + other)
    (tmp_path / ".manifest-0123abcd.jsonl").write_text("".join(records[:63:-1]))
    tracemalloc.start()
    try:
        assert job.plan() == list(range(32))  # no PNG there
        job.merge()
        assert jobs.summary(job, {"images": [0], "busy": [0.0], "wall": 0.0}, 128).startswith("done: 128 images")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak
    assert (tmp_path / "manifest.jsonl").read_text() == "".join(records) + other
    assert leftovers(tmp_path) == []
