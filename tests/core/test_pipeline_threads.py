"""One pipeline called from several threads at once gives exactly the images of the same calls made
one after another (issue 11 A1): the TGATE caches in the attention modules and the scheduler's
step state are not shared between running calls."""

import threading

import numpy as np
import pytest
import torch
from tiny_models import save_sd

import mini_tgate
from mini_tgate.loading import load_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def pipe(folder, one_thread):
    pipe = load_pipeline(folder)
    # DPM-Solver++ 2M keeps the previous step's x0: shared step state would show
    pipe.scheduler = mini_tgate.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def job(k):
    """Call k: gated or not, its own seed and prompt."""
    gate = mini_tgate.TGate(4, 2, 1, 1) if k % 2 else None
    return dict(prompt=["a red circle", "a blue square"][k % 2], num_inference_steps=8, tgate=gate,
                generator=torch.Generator().manual_seed(k), output_type="latent")


def test_concurrent_calls_equal_sequential_ones(pipe):
    calls = 12
    expected = [pipe(**job(k)).images for k in range(calls)]
    got, errors = [None] * calls, []

    def worker(w):  # 4 threads x 3 calls, interleaved gated and ungated
        try:
            for k in range(w, calls, 4):
                got[k] = pipe(**job(k)).images
        except Exception as e:  # reported below, with the thread's call
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(calls):
        assert torch.equal(got[k], expected[k]), f"call {k} differs from its sequential run"


def test_two_pipelines_sharing_one_scheduler(pipe, folder):
    """diffusers users build pipelines around another's scheduler object: each call steps its own copy."""
    other = load_pipeline(folder)
    other.scheduler = pipe.scheduler
    expected = [p(**job(k)).images for k, p in enumerate([pipe, other] * 2)]
    got = [None] * 4

    def worker(k, p):
        got[k] = p(**job(k)).images

    threads = [threading.Thread(target=worker, args=(k, p)) for k, p in enumerate([pipe, other] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_swapping_the_scheduler_mid_call_changes_nothing_in_it(pipe):
    expected = pipe(**job(1)).images
    original = pipe.scheduler

    def swap(p, i, t, tensors):  # another thread could do this at any time
        p.scheduler = mini_tgate.EulerDiscreteScheduler.from_config(original.config)
        return {}

    try:
        got = pipe(**job(1), callback_on_step_end=swap).images
    finally:
        pipe.scheduler = original
    assert torch.equal(got, expected)


def test_a_call_from_inside_a_call_is_refused(pipe):
    expected = pipe(**job(1)).images

    def reenter(p, i, t, tensors):
        p(**job(0))

    with pytest.raises(RuntimeError, match="called from inside one of its own calls"):
        pipe(**job(1), callback_on_step_end=reenter)
    assert all(m.cache is None for m in pipe.unet.attention_layers)
    assert torch.equal(pipe(**job(1)).images, expected)  # nothing left behind


def test_a_call_in_another_thread_waits_and_is_exact(pipe):
    """A callback that starts a call in another thread and waits for it would deadlock with a
    lock held by the caller; here the other call waits for this one to end instead."""
    expected = [pipe(**job(k)).images for k in (2, 3)]
    result = {}

    def start_other(p, i, t, tensors):
        if i == 0:
            thread = threading.Thread(target=lambda: result.update(other=p(**job(3)).images))
            thread.start()
            result["thread"] = thread
        return {}

    first = pipe(**job(2), callback_on_step_end=start_other).images
    result["thread"].join()
    assert torch.equal(first, expected[0]) and torch.equal(result["other"], expected[1])
