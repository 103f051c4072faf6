"""The batch operator's scenarios: one PredictionBatchOperator runs 200 prompts, a few of them refused, waiting
in the triggerer (``rel_batch``) or in its worker (``rel_batch_worker``).

`PausingBatch` pauses its first try once it has created (and recorded) at least `pause_after` items: it writes
its pid to the file named by the run's conf `pid_file` and sleeps, so the test can SIGKILL it while the batch
is still creating. The output folder comes from the conf's `destination`. Retries are on (after 2 s).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from rel_common import DAG, SCHNELL, START, Param

from airflow_comet.operators.batch import PredictionBatchOperator

PROMPTS = 200
#: Prompts the simulator refuses (the test sets `refused_words=["forbidden"]`): two among the first try's
#: items, one created just before the kill, three only by the retry.
REFUSED = (5, 19, 36, 77, 150, 199)
INPUTS = [
    {
        "prompt": f"{'A forbidden' if i in REFUSED else 'A'} picture number {i}",
        "aspect_ratio": "1:1",
        "output_format": "webp",
    }
    for i in range(PROMPTS)
]


class PausingBatch(PredictionBatchOperator):
    def _run(self, context, *args, **kwargs):
        conf = context["dag_run"].conf or {}
        self._pause = (conf.get("pid_file"), int(conf.get("pause_after", 0))) if context["ti"].try_number <= 1 else None
        return super()._run(context, *args, **kwargs)

    async def _fill(self, state, *args):
        outcomes = await super()._fill(state, *args)
        pid_file, after = self._pause or (None, 0)
        if pid_file and after and state.next >= after:
            tmp = f"{pid_file}.tmp"
            with open(tmp, "w") as handle:  # noqa: ASYNC230 - blocking on purpose, as the sleep below
                handle.write(f"{os.getpid()} {state.next}\n")
            os.replace(tmp, pid_file)
            # The test kills us here (blocking the whole process, as a hung worker would); the ids created so far
            # are in the task state store only.
            time.sleep(300)  # noqa: ASYNC251
        return outcomes


def batch_dag(dag_id: str, *, deferrable: bool, max_in_flight: int, retries: int):
    with DAG(
        dag_id=dag_id,
        start_date=START,
        schedule=None,
        catchup=False,
        params={"destination": Param("", type="string")},
        tags=["reliability"],
    ) as dag:
        PausingBatch(
            task_id="batch",
            model=SCHNELL,
            inputs=INPUTS,
            max_in_flight=max_in_flight,
            destination="{{ params.destination }}",
            max_failures=len(REFUSED),
            deferrable=deferrable,
            poll_interval=3,
            timeout=900,
            retries=retries,
            retry_delay=timedelta(seconds=2),
        )
    return dag


# One retry is the scenario; a second absorbs Airflow 3.3.2's resume race (apache/airflow#72716, see
# rel_storm.py), rare since the batch's trigger waits MIN_DEFERRAL after each deferral.
rel_batch = batch_dag("rel_batch", deferrable=True, max_in_flight=32, retries=2)
# Waiting in its worker (deferrable=False): the first try pauses once it has refilled past `pause_after`
# items, after rounds of waiting in its own event loop; no deferral, so no resume race: one retry.
rel_batch_worker = batch_dag("rel_batch_worker", deferrable=False, max_in_flight=16, retries=1)
