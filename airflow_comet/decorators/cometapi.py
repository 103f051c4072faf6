"""``@task.cometapi``: a TaskFlow function returns the model input; the task creates the prediction, waits for
it and returns the final prediction object."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import (
    SET_DURING_EXECUTION,
    DecoratedOperator,
    TaskDecorator,
    context_merge,
    determine_kwargs,
    task_decorator_factory,
)

from airflow_comet.file_inputs import FILE_INPUT_KEYS
from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.validation import _short, is_templated, validate_input, validate_model, validate_prefer_wait

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

DECORATOR_NAME = "@task.cometapi"


class _CometAPIDecoratedOperator(DecoratedOperator, CreatePredictionOperator):
    """
    Calls the decorated function in the worker to get the model input, then runs CreatePredictionOperator
    with ``wait_for_completion=True``: its ``return_value`` is the final prediction object.

    The function runs only in ``execute``: a task resumed after deferral goes straight to
    ``execute_complete``, and a retry runs the function again, then resumes the earlier try's prediction
    when the input is the same (Airflow 3.3).

    :param python_callable: The function returning the model input (a dict).
    :param op_args: Positional arguments for the function (templated).
    :param op_kwargs: Keyword arguments for the function (templated).
    """

    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, *CreatePredictionOperator.template_fields)
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **CreatePredictionOperator.template_fields_renderers,
    }
    custom_operator_name: str = DECORATOR_NAME
    # Airflow 3 stores the rendered fields again when the task ends, so the UI shows the input the function
    # returned instead of the placeholder.
    overwrite_rtif_after_execution: bool = True
    _returns = "prediction"  # what the trigger returns when it ends the task (end_from_trigger)

    def __init__(
        self,
        *,
        python_callable: Callable,
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_decorator_kwargs(kwargs)
        kwargs.pop("wait_for_completion", None)
        # An empty dict passes the operator's parse-time check of a static input; the placeholder then shows
        # in the rendered fields until the function's result, checked in execute, replaces it.
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            input={},
            wait_for_completion=True,
            **kwargs,
        )
        # Only a placeholder for the rendered fields: execute and create_after_wait put the function's result
        # here before the operator reads it, which the operator's input type cannot express.
        self.input = SET_DURING_EXECUTION  # type: ignore[assignment]  # see the comment above

    def execute(self, context: Context) -> Any:
        self._call_function(context)
        # DecoratedOperator.execute, then CreatePredictionOperator.execute: create, then wait or defer.
        return super().execute(context)

    def create_after_wait(self, context: Context, event: Any = None, create_waits: int = 0) -> Any:
        # Resumed after waiting out a 429 in the triggerer, before anything was created: the input again.
        self._call_function(context)
        return super().create_after_wait(context, event, create_waits)

    def _call_function(self, context: Context) -> None:
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        self.input = self._model_input(self.python_callable(*self.op_args, **kwargs))

    def _model_input(self, value: Any) -> dict[str, Any]:
        """The function's return value if it can be sent as the model input; a clear error otherwise."""
        name = getattr(self.python_callable, "__name__", "function")
        if not isinstance(value, Mapping):
            raise TypeError(
                f"The {DECORATOR_NAME} function {name}() must return the model input as a dict, such as "
                f"{{'prompt': 'a red fox'}}; it returned {type(value).__name__}: {_short(value)}"
            )
        try:
            # File inputs (a Path in input_image) are read and checked by the operator's execute.
            validate_input({k: v for k, v in value.items() if k not in FILE_INPUT_KEYS})
        except ValueError as error:
            raise ValueError(
                f"The {DECORATOR_NAME} function {name}() returned an unusable model input: {error}"
            ) from None
        return dict(value)

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline_is_task_timeout: bool = False
    ) -> Any:
        """Resume after the trigger fired (the function does not run again); return the final prediction."""
        # A resumed task is built afresh, with the placeholder as input: show the input the prediction echoes
        # (large data: URIs elided) in the rendered fields that Airflow 3 stores again when the task ends.
        prediction = event.get("prediction") if isinstance(event, dict) else None
        if isinstance(prediction, dict) and isinstance(prediction.get("input"), dict):
            self.input = prediction["input"]
        return super().execute_complete(context, event, deadline_is_task_timeout)

    def _finish(self, event: Any, *, deadline_is_task_timeout: bool = False) -> dict[str, Any]:
        self._final_prediction = super()._finish(event, deadline_is_task_timeout=deadline_is_task_timeout)
        return self._final_prediction

    def _complete(  # type: ignore[override]
        self, context: Context, event: Any, deadline_is_task_timeout: bool
    ) -> dict[str, Any]:
        # The operator's own completion (it also pushes the prediction under the XCom key ``prediction``)
        # returns the id; a TaskFlow task returns the final prediction, kept by _finish on the way.
        super()._complete(context, event, deadline_is_task_timeout)
        return self._final_prediction


def check_decorator_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Reject what cannot work with the decorator, and check a static model when the decorator is applied
    (a mapped task builds its operators only at run time, so the operator's own parse-time check is too late).
    """
    if "input" in kwargs:
        raise TypeError(f"{DECORATOR_NAME} takes the model input from the function's return value; drop input=")
    if kwargs.get("wait_for_completion", True) is not True:
        raise ValueError(
            f"{DECORATOR_NAME} always waits for the prediction (its return value is the final prediction); "
            "use CreatePredictionOperator to start one without waiting"
        )
    model = kwargs.get("model")
    if model is not None and not is_templated(model):
        validate_model(model)
    if kwargs.get("prefer_wait") is not None:
        validate_prefer_wait(kwargs["prefer_wait"])


def cometapi_task(
    python_callable: Callable | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """
    Wrap a function returning a model input into a task that creates the prediction and waits for it.

    Takes CreatePredictionOperator's parameters (``model``, ``cometapi_conn_id``, ``deferrable``,
    ``poll_interval``, ``timeout``, ``prefer_wait``, ``cancel_on_kill``, ``resume``) and any task parameter::

        @task.cometapi(model="black-forest-labs/flux-schnell", deferrable=True)
        def generate(prompt: str) -> dict:
            return {"prompt": prompt, "aspect_ratio": "1:1"}

        predictions = generate.expand(prompt=["a fox", "a boat"])

    :param python_callable: The function to decorate.
    :param multiple_outputs: Push each key of the final prediction as its own XCom too (default ``False``,
        whatever the function's return annotation says: it describes the input, not the task's result).
    """
    check_decorator_kwargs(kwargs)
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=bool(multiple_outputs),
        decorated_operator_class=_CometAPIDecoratedOperator,
        **kwargs,
    )
