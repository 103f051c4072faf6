"""Run a DAG for real with ``dag.test()`` and read back what it left, on Airflow 2.11 and 3.x alike."""

from __future__ import annotations

from typing import Any

from airflow import __version__ as AIRFLOW_VERSION

AIRFLOW_3 = int(AIRFLOW_VERSION.split(".")[0]) >= 3
AIRFLOW_3_3 = AIRFLOW_3 and tuple(int(p) for p in AIRFLOW_VERSION.split(".")[:2]) >= (3, 3)

if AIRFLOW_3:
    from airflow.sdk import DAG, task  # noqa: F401 - re-exported for tests
else:
    from airflow import DAG  # noqa: F401
    from airflow.decorators import task  # noqa: F401


def run(dag: Any, **kwargs: Any) -> Any:
    """``dag.test()``: scheduler-free, in this process, triggers run inline."""
    if AIRFLOW_3_3:
        _serialize(dag)
    return dag.test(**kwargs)


def _serialize(dag: Any) -> None:
    """Airflow 3.3's dag.test() runs the serialized DAG from a bundle; a DAG written in a test is in none,
    so store it the way the dag-processor would (in the default ``dags-folder`` bundle)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    from airflow.utils.session import create_session

    DagBundlesManager().sync_bundles_to_db()
    with create_session() as session:
        update_dag_parsing_results_in_db(
            "dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {}, None, set(), session=session
        )


def states(dagrun: Any) -> dict[str, str]:
    """``{task_id or task_id[map_index]: state}`` of every task instance of the run."""
    result = {}
    for ti in dagrun.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        result[key] = str(getattr(ti.state, "value", ti.state))
    return result


def xcom(dagrun: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """The XCom value ``task_id`` pushed under ``key`` in this run (``None`` when absent)."""
    from airflow.utils.session import create_session

    with create_session() as session:
        if AIRFLOW_3:
            from airflow.models.xcom import XComModel

            row = session.scalars(
                XComModel.get_many(
                    run_id=dagrun.run_id, dag_ids=dagrun.dag_id, task_ids=task_id, key=key, map_indexes=map_index
                )
            ).first()
            return None if row is None else XComModel.deserialize_value(row)
        from airflow.models.xcom import XCom

        return XCom.get_one(
            run_id=dagrun.run_id, dag_id=dagrun.dag_id, task_id=task_id, key=key, map_index=map_index, session=session
        )
