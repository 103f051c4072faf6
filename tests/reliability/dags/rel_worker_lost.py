"""Scenario 4: the worker's task process dies after the create and before the deferral.

`PausingCreate` pauses on its first try right after the prediction was created (and, on Airflow 3.3, its id
saved in the task state store): it writes its pid to the file named by the run's conf `pid_file` and sleeps,
so the test can SIGKILL it at exactly that point. Retries are on (after 2 s).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from rel_common import DAG, DEV, START

from airflow_comet.operators.prediction import CreatePredictionOperator


class PausingCreate(CreatePredictionOperator):
    def _push_link(self, context, prediction):
        super()._push_link(context, prediction)
        pid_file = (context["dag_run"].conf or {}).get("pid_file")
        if pid_file and context["ti"].try_number <= 1:
            tmp = f"{pid_file}.tmp"
            with open(tmp, "w") as handle:
                handle.write(f"{os.getpid()} {prediction['id']}\n")
            os.replace(tmp, pid_file)
            time.sleep(120)  # the test kills us here


with DAG(dag_id="rel_worker_lost", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag:
    PausingCreate(
        task_id="generate",
        model=DEV,
        input={"prompt": "scenario 4: the worker dies after the create"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        timeout=900,
        # One retry is the scenario; a second absorbs Airflow 3.3.2's "task state changed externally" race
        # (see rel_storm.py), which can fail a try that resumes quickly after its trigger fired.
        retries=2,
        retry_delay=timedelta(seconds=2),
    )
