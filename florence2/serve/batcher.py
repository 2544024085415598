"""Dynamic batching: jobs with equal generation settings gathered into one generate call."""

import concurrent.futures
import dataclasses
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class Job:
    """A prepared request waiting for its batch."""

    task: str
    image_size: tuple[int, int]
    inputs: dict  # processor(text=prompt, images=image): one row
    options: dict  # every generate option, resolved (the checkpoint's defaults filled in)
    key: object  # requests with equal keys may share a generate call
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    arrived: float = dataclasses.field(default_factory=time.monotonic)


class Batcher:
    """Gathers jobs with equal keys into batches: a batch runs when it is full, or when its oldest job has waited
    `max_wait` seconds (at once, if the model was busy meanwhile) and no request of the same key is still being
    decoded (a burst of requests arrives here one decoding after the other: they belong to one batch, so they are
    waited for, up to DECODING_WAIT). Oldest first; the thread that calls `serve` runs the model, until `stop`.
    The command gives it its main thread, the one that loaded the model: torch runs its kernels on an OpenMP team
    of the calling thread, and a second team (a second thread running the model, or preprocessing threads running
    large torch ops) makes libgomp stop spinning between parallel regions once it has more threads than cores:
    generate then kept 2 cores only 85% busy and took 15% longer (base model, batch 8, 3 beams, 2 cores)."""

    DECODING_WAIT = 0.5  # seconds, at most, that a batch waits for the requests being decoded beyond max_wait

    def __init__(self, run, max_batch_size: int, max_wait: float):
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait
        self._pending: list[Job] = []
        self._decoding: Counter = Counter()  # batch key -> requests accepted and not yet submitted
        self._ready = threading.Condition()
        self.served = {"requests": 0, "batches": 0}  # how the batching went, for /health
        self._stopped = False

    def expect(self, key) -> None:
        """A request of this key is being decoded: submit() or cancel() follows."""
        with self._ready:
            self._decoding[key] += 1

    def cancel(self, key) -> None:
        with self._ready:
            self._forget(key)
            self._ready.notify()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._ready:
            self._forget(job.key)
            self._pending.append(job)
            self._ready.notify()
        return job.future

    def _forget(self, key) -> None:
        self._decoding[key] -= 1
        if self._decoding[key] <= 0:
            del self._decoding[key]

    def stop(self) -> None:
        """`serve` returns once the batch it runs (if any) is answered."""
        with self._ready:
            self._stopped = True
            self._ready.notify()

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._pending:
                if self._stopped:
                    return None
                self._ready.wait()
            first = self._pending[0]
            while True:
                batch = [j for j in self._pending if j.key == first.key][:self.max_batch_size]
                waited = time.monotonic() - first.arrived
                if len(batch) == self.max_batch_size or waited >= self.max_wait + self.DECODING_WAIT:
                    break
                if waited >= self.max_wait and not self._decoding[first.key]:
                    break
                left = self.max_wait - waited
                self._ready.wait(left if left > 0 else self.max_wait + self.DECODING_WAIT - waited)
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        try:
            results = self.run(batch)
        except Exception as e:
            if len(batch) > 1:  # find the job that fails: the others still get their answers
                for job in batch:
                    self._answer([job])
            else:
                batch[0].future.set_exception(e)
            return
        self.served["requests"] += len(batch)
        self.served["batches"] += 1
        for job, result in zip(batch, results):
            job.future.set_result(result)
