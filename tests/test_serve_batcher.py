"""serve.batcher.Batcher on a real event loop: batches form while the model computes, a lone request
never waits, each item gets its own result or error, and a client that went away is skipped."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve.batcher import Batcher


class Model:
    """A batch function that records its batches and takes ``seconds`` per call (in its thread)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list] = []
        self.threads: set[int] = set()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return [ValueError(f"bad {item}") if isinstance(item, str) else item * 10 for item in items]


def test_a_lone_request_is_computed_at_once_even_with_a_long_wait():
    model = Model()
    batcher = Batcher(model, max_size=8, wait_s=5.0)

    async def one():
        begun = time.perf_counter()
        result = await batcher.submit(3)
        return result, time.perf_counter() - begun

    result, took = asyncio.run(one())
    assert result == 30 and model.batches == [[3]]
    assert took < 1.0  # not the 5 s wait: nothing else was in flight
    assert threading.get_ident() not in model.threads  # computed off the event loop


def test_requests_arriving_while_the_model_computes_form_the_next_batch():
    model = Model(seconds=0.2)
    batcher = Batcher(model, max_size=4, wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch [0] is computing now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 50, 60]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6]]  # max_size caps a batch; the rest go next


def test_under_concurrent_load_a_batch_waits_for_as_many_as_the_previous_one():
    model = Model(seconds=0.05)
    batcher = Batcher(model, max_size=8, wait_s=1.0)

    async def scenario():
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))  # one batch of 3
        started = time.perf_counter()
        late = []
        for i in range(3):  # the clients come back one by one, 20 ms apart
            late.append(asyncio.ensure_future(batcher.submit(10 + i)))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*late)
        return results, time.perf_counter() - started

    results, took = asyncio.run(scenario())
    assert results == [100, 110, 120]
    assert model.batches == [[0, 1, 2], [10, 11, 12]]
    assert took < 0.5  # it stopped waiting once 3 were there, well before wait_s


@pytest.mark.parametrize("max_size", [1, 8])
def test_each_item_gets_its_own_result_or_error(max_size):
    model = Model()
    batcher = Batcher(model, max_size=max_size, wait_s=0.0)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(item) for item in [1, "x", 2]), return_exceptions=True)

    one, bad, two = asyncio.run(scenario())
    assert (one, two) == (10, 20)
    assert isinstance(bad, ValueError) and str(bad) == "bad x"


def test_a_cancelled_request_is_left_out_and_the_rest_still_answered():
    model = Model(seconds=0.1)
    batcher = Batcher(model, max_size=8, wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()  # its client disconnected while the first batch computed
        return await first, await kept

    assert asyncio.run(scenario()) == (0, 20)
    assert model.batches == [[0], [2]]
