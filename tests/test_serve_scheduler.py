"""Continuous batching: requests that join and leave a running batch get the answers they get alone.

The scheduler is stepped by hand here (no thread, no HTTP), so every test decides exactly when each request
arrives relative to the others' decode steps.
"""

from __future__ import annotations

import pytest
import torch

from minillava.pipeline import Pipeline, with_image_markers
from minillava.serve.scheduler import Failed, Finished, Job, Piece, Scheduler
from tests.serve_fixtures import QUESTIONS


@pytest.fixture(scope="module")
def pipe(bundled_pipeline) -> Pipeline:
    return bundled_pipeline


class Answer:
    """Collects one job's events."""

    def __init__(self) -> None:
        self.events = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Piece))

    @property
    def end(self):
        return self.events[-1] if self.events and not isinstance(self.events[-1], Piece) else None


def make_job(pipe: Pipeline, question: str, image, **settings) -> tuple[Job, Answer]:
    text = pipe.template.format([{"role": "user", "content": with_image_markers(question, 1)}])
    ids = pipe.processor.encode(text)
    config = pipe.generation_settings(None, settings, len(ids))
    answer = Answer()
    pixels = pipe.processor(text, images=[image])["pixel_values"]
    return Job(ids, pixels, config, pipe.text_rows(1, config)[0], answer), answer


def run_until_idle(scheduler: Scheduler, arrivals: dict[int, list[Job]], max_steps: int = 500) -> list[int]:
    """Step until nothing is left, submitting ``arrivals[k]`` before step ``k``; return ``cache.filled`` after
    each step."""
    filled = []
    for step in range(max_steps):
        for job in arrivals.get(step, []):
            scheduler.submit(job)
        if step > max(arrivals) and not scheduler.stats()["active"] and not scheduler.stats()["queued"]:
            return filled
        scheduler.step()
        filled.append(scheduler.cache.filled)
    raise AssertionError("the scheduler did not finish")


def test_requests_joining_a_running_batch_get_their_solo_answers(pipe):
    scheduler = Scheduler(pipe.model, slots=3)
    jobs = [make_job(pipe, q, image) for image, q in QUESTIONS[:6]]
    # Two at once, one three steps later, three more while all rows are busy (they wait for a free row).
    arrivals = {0: [j for j, _ in jobs[:2]], 3: [jobs[2][0]], 5: [j for j, _ in jobs[3:]]}
    busiest = 0
    for step in range(500):
        for job in arrivals.get(step, []):
            scheduler.submit(job)
        scheduler.step()
        busiest = max(busiest, scheduler.stats()["active"])
        if step > 5 and not scheduler.stats()["active"] and not scheduler.stats()["queued"]:
            break
    assert busiest == 3
    for (image, question), (_, answer) in zip(QUESTIONS[:6], jobs, strict=True):
        assert isinstance(answer.end, Finished) and answer.end.reason == "stop"
        assert answer.text == pipe.chat(question, images=[image])
    assert scheduler.stats() == {"slots": 3, "active": 0, "queued": 0, "finished": 6, "cancelled": 0, "failed": 0}


def test_a_full_cache_is_compacted_and_decoding_goes_on(pipe):
    # Long answers (about 25 tokens) arriving while the one before is mid-answer: the shared column passes the
    # end of a cache just long enough for one request.
    images = [QUESTIONS[i][0] for i in (0, 3, 5, 0)]
    jobs = [make_job(pipe, "Describe the image briefly.", image, max_new_tokens=40) for image in images]
    scheduler = Scheduler(pipe.model, slots=2, max_len=max(len(j.ids) for j, _ in jobs) + 40)
    filled = run_until_idle(scheduler, {0: [jobs[0][0]], 8: [jobs[1][0]], 16: [jobs[2][0], jobs[3][0]]})
    assert max(filled) == scheduler.max_len
    assert any(0 < b < a for a, b in zip(filled, filled[1:], strict=False)), "no compaction happened"
    for image, (_, answer) in zip(images, jobs, strict=True):
        assert answer.text == pipe.chat("Describe the image briefly.", images=[image], max_new_tokens=40)


def test_sampling_settings_and_seed_apply_per_row(pipe):
    scheduler = Scheduler(pipe.model, slots=3)
    settings = [dict(temperature=2.0, top_p=0.95, seed=7), {}, dict(temperature=2.0, top_k=20, seed=8)]
    jobs = [
        make_job(pipe, "Describe the image briefly.", image, **s)
        for (image, _), s in zip(QUESTIONS, settings, strict=False)
    ]
    run_until_idle(scheduler, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]]})
    answers = [answer.text for _, answer in jobs]
    for (image, _), s, got in zip(QUESTIONS, settings, answers, strict=False):
        assert got == pipe.chat("Describe the image briefly.", images=[image], **s)
    greedy = pipe.chat("Describe the image briefly.", images=[QUESTIONS[0][0]])
    assert answers[0] != greedy, "the sampled answer should differ from the greedy one at this temperature"


def test_a_cancelled_request_frees_its_row_at_once(pipe):
    scheduler = Scheduler(pipe.model, slots=2)
    (left, left_answer), (stays, stays_answer) = (make_job(pipe, q, image) for image, q in QUESTIONS[0::3][:2])
    scheduler.submit(left)
    scheduler.submit(stays)
    scheduler.step()
    scheduler.step()
    assert scheduler.stats()["active"] == 2
    left.cancel()
    scheduler.step()
    assert scheduler.rows[0] is None and scheduler.stats()["cancelled"] == 1
    run_until_idle(scheduler, {0: []})
    assert left_answer.end is None  # nothing more was sent to the client that left
    assert stays_answer.text == pipe.chat(QUESTIONS[3][1], images=[QUESTIONS[3][0]])


def test_a_failure_inside_the_model_fails_that_request_alone(pipe):
    scheduler = Scheduler(pipe.model, slots=2)
    running, running_answer = make_job(pipe, *QUESTIONS[0][::-1])
    poisoned, poisoned_answer = make_job(pipe, *QUESTIONS[2][::-1])
    after, after_answer = make_job(pipe, *QUESTIONS[1][::-1])

    def vision_fails_on_the_poisoned_image(module, args):
        if torch.equal(args[0], poisoned.pixel_values):
            raise RuntimeError("simulated failure in the vision tower")

    hook = pipe.model.vision.register_forward_pre_hook(vision_fails_on_the_poisoned_image)
    try:
        run_until_idle(scheduler, {0: [running], 3: [poisoned], 6: [after]})
    finally:
        hook.remove()
    assert isinstance(poisoned_answer.end, Failed) and poisoned_answer.end.status == 500
    assert "simulated failure" in poisoned_answer.end.message and not poisoned_answer.text
    assert running_answer.text == pipe.chat(QUESTIONS[0][1], images=[QUESTIONS[0][0]])
    assert after_answer.text == pipe.chat(QUESTIONS[1][1], images=[QUESTIONS[1][0]])
    assert scheduler.stats()["failed"] == 1 and scheduler.stats()["finished"] == 2


def test_llava_1_6_images_of_different_sizes_get_their_solo_answers(tmp_path):
    """Tiles and image sizes through the server's own request path: each image expands to its own count."""
    import json

    from minillava.serve.inputs import prepare
    from minillava.serve.protocol import parse_chat_request
    from tests.next_reference import make_next_checkpoint, random_image
    from tests.serve_fixtures import image_message

    pipe = Pipeline(make_next_checkpoint(tmp_path / "model", seed=3))
    images = []
    for i, size in enumerate([(30, 50), (90, 90)]):
        images.append(tmp_path / f"{i}.png")
        random_image(*size, seed=i).save(images[-1])
    scheduler = Scheduler(pipe.model, slots=2)
    jobs = []
    for image in images:
        body = {"messages": [image_message("What is it?", image)], "max_tokens": 8}
        inputs = prepare(pipe, parse_chat_request(json.dumps(body).encode()), scheduler.max_len)
        answer = Answer()
        jobs.append(
            (Job(inputs.ids, inputs.pixel_values, inputs.config, inputs.text, answer, inputs.image_sizes), answer)
        )
    run_until_idle(scheduler, {0: [jobs[0][0]], 2: [jobs[1][0]]})
    for image, (_, answer) in zip(images, jobs, strict=True):
        assert isinstance(answer.end, Finished)
        assert answer.text == pipe.chat("What is it?", images=[image], max_new_tokens=8)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_serve_their_solo_answers(scheme):
    from minillava.config import BUNDLED_MODEL

    quantized = Pipeline(BUNDLED_MODEL, quantize=scheme)
    scheduler = Scheduler(quantized.model, slots=3)
    jobs = [make_job(quantized, q, image) for image, q in QUESTIONS[:4]]
    run_until_idle(scheduler, {0: [j for j, _ in jobs[:3]], 2: [jobs[3][0]]})
    for (image, question), (_, answer) in zip(QUESTIONS[:4], jobs, strict=True):
        assert isinstance(answer.end, Finished)
        assert answer.text == quantized.chat(question, images=[image])
