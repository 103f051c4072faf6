"""The operator's wait in the worker (``deferrable=False``) against the simulator: what it logs."""

from __future__ import annotations

import logging
import threading
import time

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.testing import Faults
from tests.conftest import API_KEY


def test_worker_wait_logs_nonsense_answers_and_each_status_change(sim, caplog, capsys):
    caplog.set_level(logging.INFO)
    sim.set_faults(Faults(durations=4, unknown_status="warming_up"))
    op = CreatePredictionOperator(
        task_id="create", model="black-forest-labs/flux-schnell", input={"prompt": "a fox"}, deferrable=False
    )
    prediction = op.hook.create_prediction(op.model, op.input)

    def heal_after_two_polls() -> None:
        deadline = time.monotonic() + 20
        while len(sim.polls(prediction["id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sim.set_faults(Faults(durations=4))

    healer = threading.Thread(target=heal_after_two_polls)
    healer.start()
    event = op._wait_in_worker(prediction, end_time=time.time() + 30)
    healer.join()
    # Airflow 3 logs through structlog to stdout, Airflow 2 through logging: read both.
    logged = caplog.text + capsys.readouterr().out
    assert event["status"] == "succeeded"
    assert logged.count("the answer has no known status (status='warming_up')") >= 2
    # The change that ended the wait is logged; the create answer's status was known already and is not.
    assert f"Prediction {prediction['id']} is succeeded" in logged
    assert f"Prediction {prediction['id']} is starting" not in logged
    assert API_KEY not in logged
