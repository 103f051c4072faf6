"""A retry of the same task resumes the prediction it already paid for (Airflow 3.3's task state store)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.resume import fingerprint
from airflow_comet.testing import Faults
from tests.dagrun import AIRFLOW_3_3, run, states, xcom
from tests.test_dags import FLUX, dag


class WorkerLostAfterCreate(CreatePredictionOperator):
    """Fails its first try right after the create, as a worker killed between create and wait would."""

    def _wait_in_worker(self, prediction, end_time):
        if self._first_try:
            raise RuntimeError("worker lost")
        return super()._wait_in_worker(prediction, end_time)

    def execute(self, context):
        self._first_try = context["ti"].try_number == 1
        return super().execute(context)


def retrying_dag(dag_id: str, prompt: str = "x"):
    with dag(dag_id) as d:
        WorkerLostAfterCreate(
            task_id="gen",
            model=FLUX,
            input={"prompt": prompt},
            wait_for_completion=True,
            deferrable=False,
            retries=1,
            retry_delay=timedelta(seconds=0),
        )
    return d


@pytest.mark.skipif(not AIRFLOW_3_3, reason="the task state store arrived in Airflow 3.3")
def test_retry_resumes_the_running_prediction(sim):
    sim.set_faults(Faults(durations=3.0))
    dr = run(retrying_dag("t_resume"))
    assert states(dr) == {"gen": "success"}
    assert dr.get_task_instance("gen").try_number == 2
    [create] = sim.creates()
    assert xcom(dr, "gen") == create.prediction_id


@pytest.mark.skipif(AIRFLOW_3_3, reason="documents the behaviour without a task state store")
def test_without_a_state_store_a_retry_creates_again(sim):
    sim.set_faults(Faults(durations=3.0))
    dr = run(retrying_dag("t_resume_old"))
    assert states(dr) == {"gen": "success"}
    assert len(sim.creates()) == 2


def test_fingerprint_changes_with_model_input_and_connection():
    base = fingerprint("c", FLUX, {"prompt": "x"})
    assert base == fingerprint("c", FLUX, {"prompt": "x"})
    assert base != fingerprint("c", FLUX, {"prompt": "y"})
    assert base != fingerprint("d", FLUX, {"prompt": "x"})
    assert base != fingerprint("c", "black-forest-labs/flux-dev", {"prompt": "x"})


def test_a_succeeded_prediction_is_resumed_only_while_its_outputs_can_still_be_downloaded(sim):
    from airflow_comet.hooks._protocol import iso_epoch
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import SUCCEEDED_RESUMABLE_FOR, why_not_resumable

    sim.set_faults(Faults(durations=0.2))
    hook = CometAPIHook()
    running = hook.create_prediction(FLUX, {"prompt": "x"})
    assert why_not_resumable(running, iso_epoch(running["created_at"])) is None
    done = running
    while done["status"] != "succeeded":
        done = hook.get_prediction(running["id"])
    completed = iso_epoch(done["completed_at"])
    assert why_not_resumable(done, completed + 60) is None
    assert "expired" in why_not_resumable(done, completed + SUCCEEDED_RESUMABLE_FOR + 1)
    assert "removed" in why_not_resumable({**done, "data_removed": True}, completed + 60)
    assert why_not_resumable({**done, "status": "failed"}, completed) == "it ended failed"
    assert why_not_resumable(None, completed) == "it is gone"
