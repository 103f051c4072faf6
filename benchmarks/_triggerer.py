"""A stand-in triggerer process for the benchmark: ``python -m benchmarks._triggerer --out result.json``.

It runs triggers the way Airflow's ``TriggerRunner`` does, minus the database and the supervisor:

- serialized triggers (``serialize()`` output, one JSON line each on stdin, as a worker deferring a task
  would store them) are picked up in batches once a second, each rebuilt with ``import_string(classpath)
  (**kwargs)`` and run as its own asyncio task in one event loop (with greenback's portal, as Airflow 3
  does, when greenback is installed);
- a watchdog task measures the event loop's stalls (Airflow's ``block_watchdog`` warns above 0.2 s).

It measures its own process only: CPU (``getrusage``), RSS (``/proc/self/status``), and the wall-clock time
each trigger fired its event. A line ``{"done": N}`` on stdin says no more triggers will come; the process
writes its result as JSON to ``--out`` once N events have fired (or at ``--deadline`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._measure import cpu_seconds

TICK = 0.05


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu_split() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class Runner:
    def __init__(self, deadline: float, greenback: bool) -> None:
        self.deadline = deadline
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.expected: int | None = None
        self.events: dict[str, tuple[float, Any]] = {}
        self.picked: dict[str, float] = {}
        self.arrived: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.alive = 0
        self.max_alive = 0
        self.created = 0
        self.max_stall = 0.0
        self.stalls_over_100ms = 0
        self.classes: dict[str, type] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self.rss_samples: list[tuple[float, int, int]] = []  # (t, alive, rss kB)
        self.profile: Any = None
        self.ready_file: str | None = None
        self.gc_freeze = False
        self.gc_census = False
        self.full_gcs: list[tuple[float, int, int]] = []  # (ms, objects walked, triggers running), --gc-census
        self.promoted: collections.Counter[str] = collections.Counter()  # by type, --gc-census
        self.startup_objects = 0
        self.greenback = None
        if greenback:
            try:
                import greenback as gb

                self.greenback = gb
            except ImportError:
                pass

    async def read_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            item = json.loads(line)
            if "done" in item:
                self.expected = int(item["done"])
            else:
                self.arrived[item["key"]] = time.time()
                self.pending.append(item)

    async def watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self.finished.is_set():
            await asyncio.sleep(TICK)
            now = loop.time()
            stall = now - last - TICK
            if stall > self.max_stall:
                self.max_stall = stall
            if stall > 0.1:
                self.stalls_over_100ms += 1
            last = now

    async def sample_memory(self) -> None:
        start = time.monotonic()
        while not self.finished.is_set():
            self.rss_samples.append((round(time.monotonic() - start, 1), self.alive, _status_kb("VmRSS")))
            await asyncio.sleep(1.0)

    def watch_gc(self) -> None:
        """Time every garbage collection: a full one over a large heap is the usual cause of long stalls."""
        started = [0.0]
        self.gc_max = [0.0, 0.0, 0.0]
        self.gc_count = [0, 0, 0]
        self.gc_total = 0.0

        young: dict[int, str] = {}  # --gc-census: id -> type name of the objects a young collection examines

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                if self.gc_census and info["generation"] == 1:
                    young.update((id(o), type(o).__name__) for g in (0, 1) for o in gc.get_objects(g))
                started[0] = time.perf_counter()
                return
            took = time.perf_counter() - started[0]
            gen = info["generation"]
            if gen == 1 and self.gc_census:
                self.count_promoted(young)
            if gen == 2 and self.gc_census:
                # What this full collection walked: every tracked object left, none of a frozen heap. Counting
                # them blocks the loop too (tens of ms at N = 5,000), so the ticker's figures are not the run's.
                self.full_gcs.append((took * 1000, len(gc.get_objects()), self.alive))
            self.gc_count[gen] += 1
            self.gc_total += took
            self.gc_max[gen] = max(self.gc_max[gen], took)

        self.gc_callback = callback
        gc.callbacks.append(callback)

    def count_promoted(self, young: dict[int, str]) -> None:
        """Count, by type, the objects the young collection that just ended moved to the oldest generation.

        CPython (3.11 to 3.13) runs a full collection when those promoted since the last reach a quarter of the
        objects it kept: what a waiting trigger keeps past a second or two (so past a young collection) brings
        the next one closer, even when it is freed soon after. The collector appends them to the oldest
        generation's list, so they are its last objects that were young when the collection began.
        """
        oldest = gc.get_objects(2)
        i = len(oldest) - 1
        while i >= 0 and id(oldest[i]) in young:
            self.promoted[young[id(oldest[i])]] += 1
            i -= 1
        del oldest
        young.clear()

    def trigger_class(self, classpath: str) -> type:
        cls = self.classes.get(classpath)
        if cls is None:
            # What import_string does (airflow.utils.module_loading on 2.x, airflow._shared on 3.x).
            module, _, name = classpath.rpartition(".")
            cls = self.classes[classpath] = getattr(importlib.import_module(module), name)
        return cls

    async def run_trigger(self, key: str, trigger: Any) -> None:
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        try:
            if self.greenback is not None:
                await self.greenback.ensure_portal()
            agen = trigger.run()
            try:
                async for event in agen:
                    # Its status only, as the result keeps it: Airflow's runner hands an event on within a
                    # second and keeps nothing of it, so neither may the stand-in (a kept payload with a
                    # prediction inside is a few more objects per trigger for every full collection).
                    self.events[key] = (time.time(), _jsonable(event.payload))
                    break
            finally:
                await agen.aclose()
        except Exception as error:  # noqa: BLE001 - a benchmark counts it, the triggerer would log it
            self.errors[key] = repr(error)
        finally:
            self.alive -= 1
            if self.expected is not None and len(self.events) + len(self.errors) >= self.expected:
                self.finished.set()

    async def create_triggers(self) -> None:
        # TriggerRunner.create_triggers: drain the queue, yielding to the loop around every creation.
        while self.pending:
            await asyncio.sleep(0)
            item = self.pending.popleft()
            cls = self.trigger_class(item["classpath"])
            await asyncio.sleep(0)
            trigger = cls(**item["kwargs"])
            self.picked[item["key"]] = time.time()
            task = asyncio.create_task(self.run_trigger(item["key"], trigger), name=item["key"])
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.created += 1

    async def main(self, preload: list[str]) -> dict[str, Any]:
        for classpath in preload:
            self.trigger_class(classpath)
        gc.collect()
        self.startup_objects = len(gc.get_objects())
        if self.gc_freeze:
            gc.freeze()
        stdin_task = asyncio.create_task(self.read_stdin())
        if self.ready_file:
            Path(self.ready_file).touch()
        # Nothing is measured until the first trigger arrives.
        while not self.pending:
            await asyncio.sleep(0.01)
        rss_base = _status_kb("VmRSS")
        if self.profile is not None:
            self.profile.enable()
        cpu_start, wall_start = cpu_seconds(), time.monotonic()
        split_start = _cpu_split()
        self.watch_gc()
        watchdog = asyncio.create_task(self.watchdog())
        sampler = asyncio.create_task(self.sample_memory())
        hard_stop = wall_start + self.deadline
        while not self.finished.is_set() and time.monotonic() < hard_stop:
            await self.create_triggers()
            if self.expected == 0:
                break
            try:
                await asyncio.wait_for(self.finished.wait(), timeout=1.0)  # TriggerRunner: move_on_after(1)
            except asyncio.TimeoutError:
                pass
        cpu = cpu_seconds() - cpu_start
        split = [b - a for a, b in zip(split_start, _cpu_split())]
        wall = time.monotonic() - wall_start
        if self.profile is not None:
            self.profile.disable()
        rss_peak = _status_kb("VmHWM")
        # Collections while the triggers are torn down below are not the run's: stop timing them now.
        gc.callbacks.remove(self.gc_callback)
        self.finished.set()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, watchdog, sampler, return_exceptions=True)
        stdin_task.cancel()
        return {
            "cpu_s": cpu,
            "cpu_user_s": split[0],
            "cpu_system_s": split[1],
            "wall_s": wall,
            "rss_base_kb": rss_base,
            "rss_peak_kb": rss_peak,
            "max_alive": self.max_alive,
            "created": self.created,
            "max_stall_s": self.max_stall,
            "stalls_over_100ms": self.stalls_over_100ms,
            "gc_max_s": self.gc_max,
            "gc_count": self.gc_count,
            "gc_total_s": self.gc_total,
            "full_gcs": self.full_gcs,
            "promoted": dict(self.promoted.most_common()),
            "startup_objects": self.startup_objects,
            "events": {k: [t, p] for k, (t, p) in self.events.items()},
            "errors": self.errors,
            "picked": self.picked,
            "arrived": self.arrived,
            "timed_out": len(self.events) + len(self.errors) < (self.expected or 0),
            "rss_samples": self.rss_samples,
        }


def _jsonable(payload: Any) -> Any:
    if isinstance(payload, dict):
        return {"status": payload.get("status")}
    return payload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline", type=float, default=600.0)
    parser.add_argument("--no-greenback", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--own-loop", action="store_true", help="PredictionTrigger polls on its own (before the shared poller)")
    parser.add_argument("--variant", action="append", default=[], help="benchmarks._variants function to apply")
    parser.add_argument("--preload", nargs="*", default=[])
    parser.add_argument("--ready-file", help="touched once the process is ready for triggers")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the start-up heap (Airflow does not)")
    parser.add_argument("--gc-census", action="store_true", help="count the objects each full collection walked, and by type those promoted to the oldest generation")
    parser.add_argument("--profile", help="write a cProfile of the whole run here")
    args = parser.parse_args()
    # The triggerer logs each trigger's start and event; the benchmark keeps only warnings, for every side.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("airflow", "airflow_comet", "airflow.task", "airflow.triggers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.own_loop:
        from benchmarks import _variants

        _variants.own_loop()
    for name in args.variant:
        from benchmarks import _variants

        getattr(_variants, name)()
    runner = Runner(args.deadline, greenback=not args.no_greenback)
    runner.ready_file = args.ready_file
    runner.gc_freeze = args.gc_freeze
    runner.gc_census = args.gc_census
    if args.profile:
        import cProfile

        # CPU time, not wall time: a profile of an event loop is otherwise mostly the idle epoll wait and
        # the moments the simulator process held the other core.
        runner.profile = cProfile.Profile(time.process_time)
    if args.uvloop:
        import uvloop

        result = uvloop.run(runner.main(args.preload))
    else:
        result = asyncio.run(runner.main(args.preload))
    if runner.profile is not None:
        runner.profile.dump_stats(args.profile)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    main()
