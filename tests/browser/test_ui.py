"""The connection form and the task page as a person sees them: Airflow 3.3's UI in headless Chromium.

Against a real deployment (``tests/e2e/deployment.py``: api-server, scheduler, dag-processor, triggerer and the
CometAPI simulator; the simple auth manager with everyone admin, so the browser needs no login):

- the Add Connection form of a ``cometapi`` connection: each numeric field puts a negative value back to its
  minimum, the port that Airflow 3.3.2's Test button needs can be filled in, and the connection saves;
- the Test button of the connections list: success with the simulator's key; with a wrong key, the provider's
  message about "this connection" (not the throwaway id Airflow tests under);
- the task page of a run of ``dags/ui_link.py``: its "CometAPI prediction" link is the prediction's first
  output image (200, ``image/*``); a failed prediction has no link.

``AIRFLOW_COMET_SCREENSHOTS=<folder>`` saves the screenshots that docs/ui.md shows (docs/images).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_comet.get_provider_info import get_provider_info
from tests.e2e.deployment import API_KEY, AirflowDeployment, DeploymentConfig, airflow_version

if airflow_version() < (3, 3):
    pytest.skip("the browser tests drive Airflow 3.3's UI (Airflow 2's Flask UI differs)", allow_module_level=True)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs Chromium and its chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="selenium is not installed (it is in requirements/airflow-3.3.txt)")

from selenium import webdriver  # noqa: E402 - after the skips above
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DAG_ID = "ui_link"
CONN_ID = "comet_ui"
WRONG_KEY = "sk-wrong-0123456789"
#: The simulator refuses prompts with this word (its ``refused_words`` fault): the prediction fails.
REFUSED = "forbidden"
SCREENSHOTS = os.environ.get("AIRFLOW_COMET_SCREENSHOTS")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowDeployment]:
    config = DeploymentConfig(
        dags_folder=Path(__file__).parent / "dags",
        simulator_faults={"durations": 1.5, "refused_words": [REFUSED]},
        # Airflow disables the Test button unless told otherwise.
        airflow_config={"core": {"test_connection": "Enabled"}},
    )
    with AirflowDeployment(config, base_dir=tmp_path_factory.mktemp("airflow-home")) as dep:
        yield dep
    assert not dep.leftover_pids()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-proxy-server",  # loopback only
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# -- the connection form and the Test button ----------------------------------------------------------------


def test_connection_form_bounds_numbers_and_the_test_button_checks_the_key(
    deployment: AirflowDeployment, browser: WebDriver
) -> None:
    assert deployment.simulator is not None
    browser.get(f"{deployment.api_url}/connections")
    click(browser, wait_for(browser, lambda: button(browser, "Add Connection")))
    dialog = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, "[role=dialog]"))
    dialog.find_element(By.NAME, "connection_id").send_keys(CONN_ID)
    kind = dialog.find_element(By.CSS_SELECTOR, "input[role=combobox]")
    kind.send_keys("CometAPI")
    wait_for(browser, lambda: browser.find_element(By.XPATH, "//*[@role='option' and normalize-space()='CometAPI']"))
    kind.send_keys(Keys.ENTER)

    host = wait_for(browser, lambda: dialog.find_element(By.NAME, "host"))
    snap(browser, "connection-form.png", dialog)
    host.send_keys(deployment.simulator.base_url)
    dialog.find_element(By.NAME, "password").send_keys(API_KEY)
    # Without a saved port, Airflow 3.3.2's Test button fails with "Bad Request" (docs/troubleshooting.md):
    # the field shows, and says so.
    port = dialog.find_element(By.NAME, "port")
    assert "Test" in port.get_attribute("placeholder"), port.get_attribute("placeholder")
    port.send_keys("443")

    click(browser, button(dialog, "Extra Fields"))
    numeric = {
        name: spec["schema"]
        for name, spec in get_provider_info()["connection-types"][0]["conn-fields"].items()
        if {"number", "integer"} & set(spec["schema"]["type"])
    }
    assert "max_requests_per_second" in numeric
    for name, schema in numeric.items():
        field = wait_for(browser, partial(visible_field, dialog, f"element_{name}"))
        before = field.get_attribute("value") or ""
        type_into(browser, field, "-5")
        # The form puts a value below the schema's minimum back to it when the field loses focus (or empties
        # the field, seen for max_retries whose minimum is 0: empty is the hook's default).
        wait_for(browser, partial(shows_other_than, field, "-5"), timeout=5)
        shown = field.get_attribute("value")
        assert float(shown or 0) == schema["minimum"], (name, shown)
        type_into(browser, field, "2.5" if name == "max_requests_per_second" else before)
    snap(browser, "connection-form-extra.png", dialog)

    click(browser, button(dialog, "Save"))
    saved = wait_for(browser, lambda: connection(deployment))
    extra = json.loads(saved["extra"])
    assert saved["port"] == 443 and extra["max_requests_per_second"] == 2.5, saved
    assert all(extra.get(name) is None or extra[name] >= schema["minimum"] for name, schema in numeric.items()), extra

    # The Test button of the connections list sends the saved connection; the api-server tests it.
    message = press_test(browser, deployment)
    assert message.startswith("Test Connection Successful"), message
    assert f"Connected to {deployment.simulator.base_url}" in message and "key was accepted" in message, message
    snap(browser, "connection-test.png")

    # A wrong key: the provider's message speaks of "this connection", not of the id Airflow tested under.
    click(browser, row_button(browser, "Edit Connection"))
    dialog = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, "[role=dialog]"))
    type_into(browser, wait_for(browser, lambda: dialog.find_element(By.NAME, "password")), WRONG_KEY)
    click(browser, button(dialog, "Save"))
    wait_for(browser, lambda: not browser.find_elements(By.CSS_SELECTOR, "[role=dialog]"))
    message = press_test(browser, deployment, title="Test Connection Failed")
    assert "401" in message and "Check the CometAPI key in this connection" in message, message
    assert not re.search(r"[Cc]onnection '", message), message
    assert WRONG_KEY not in message and API_KEY not in message


def connection(deployment: AirflowDeployment) -> dict[str, Any] | None:
    response = deployment.api.request("GET", f"connections/{CONN_ID}", expect=(200, 404))
    return response.json() if response.status_code == 200 else None


def press_test(browser: WebDriver, deployment: AirflowDeployment, title: str = "Test Connection") -> str:
    """Press the Test button of ``CONN_ID``'s row in the connections list; the text of the toast that answers."""
    browser.get(f"{deployment.api_url}/connections")
    click(browser, wait_for(browser, lambda: row_button(browser, "Test Connection")))

    def toast() -> str | None:
        texts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-scope=toast][data-part=root]")]
        # Title and description: the description may come a moment after the title.
        return next((text for text in texts if text.startswith(title) and "\n" in text.strip()), None)

    return wait_for(browser, toast, timeout=60)


def row_button(browser: WebDriver, label: str) -> WebElement:
    """The button labelled ``label`` in the connections list's row of ``CONN_ID``."""
    [row] = [r for r in browser.find_elements(By.CSS_SELECTOR, "tbody tr") if r.text.split()[:1] == [CONN_ID]]
    return row.find_element(By.CSS_SELECTOR, f"button[aria-label='{label}']")


# -- the task page's link -----------------------------------------------------------------------------------


def test_task_page_links_the_output_image_and_nothing_for_a_failed_prediction(
    deployment: AirflowDeployment, browser: WebDriver
) -> None:
    deployment.wait_for_dag(DAG_ID, timeout=90)
    run, _ = deployment.run_and_wait(DAG_ID, conf={"prompt": "a lighthouse in a storm"}, timeout=90, watch=False)
    run_id = run["dag_run_id"]
    assert run["state"] == "success", deployment.run_report(DAG_ID, run_id)

    open_task_details(browser, deployment, run_id)
    link = wait_for(browser, lambda: browser.find_element(By.XPATH, "//a[normalize-space()='CometAPI prediction']"))
    url = link.get_attribute("href")
    assert url == deployment.api.xcom(DAG_ID, run_id, "generate", key="prediction")["output"][0]
    assert link.get_attribute("target") == "_blank"
    session = requests.Session()
    session.trust_env = False  # loopback only
    image = session.get(url, timeout=15)
    assert image.status_code == 200 and image.headers["Content-Type"].startswith("image/"), image.headers
    snap(browser, "task-link.png", height=350)

    failed, _ = deployment.run_and_wait(DAG_ID, conf={"prompt": f"a {REFUSED} lighthouse"}, timeout=90, watch=False)
    assert failed["state"] == "failed", deployment.run_report(DAG_ID, failed["dag_run_id"])
    links = deployment.api.get(f"dags/{DAG_ID}/dagRuns/{failed['dag_run_id']}/taskInstances/generate/links")
    assert links["extra_links"] == {"CometAPI prediction": None}
    open_task_details(browser, deployment, failed["dag_run_id"])
    # The Details tab lists the extra links first: they are loaded once the task's details are.
    wait_for(browser, lambda: "Extra Links" in browser.find_element(By.TAG_NAME, "body").text)
    assert not browser.find_elements(By.XPATH, "//a[normalize-space()='CometAPI prediction']")


def open_task_details(browser: WebDriver, deployment: AirflowDeployment, run_id: str) -> None:
    """The task page of ``generate`` in ``run_id``, on its Details tab (where Airflow 3.3 shows extra links)."""
    browser.get(f"{deployment.api_url}/dags/{DAG_ID}/runs/{run_id}/tasks/generate")
    tab = "//*[@role='tab' or self::a][normalize-space()='Details']"
    click(browser, wait_for(browser, lambda: browser.find_element(By.XPATH, tab)))


# -- helpers ------------------------------------------------------------------------------------------------


def wait_for(browser: WebDriver, find: Callable[[], Any], timeout: float = 30) -> Any:
    """``find()``'s first truthy result; an element not there yet, or replaced while looked at, is "not yet"."""

    def attempt(_: WebDriver) -> Any:
        try:
            return find()
        except (NoSuchElementException, StaleElementReferenceException, ValueError):  # ValueError: no row yet
            return None

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(attempt, f"waited {timeout} s for {find}")


def button(scope: WebDriver | WebElement, text: str) -> WebElement:
    return scope.find_element(By.XPATH, f".//button[normalize-space()='{text}']")


def visible_field(scope: WebElement, name: str) -> WebElement | None:
    element = scope.find_element(By.NAME, name)
    return element if element.is_displayed() else None


def shows_other_than(field: WebElement, text: str) -> bool:
    return field.get_attribute("value") != text


def click(browser: WebDriver, element: WebElement) -> None:
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    try:
        element.click()
    except ElementClickInterceptedException:  # a tooltip of the row's buttons is in the way
        browser.execute_script("arguments[0].click()", element)


def type_into(browser: WebDriver, field: WebElement, text: str) -> None:
    """Replace the field's text as a person does, then leave the field (the form checks bounds on blur)."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.click()
    for _ in range(3):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        # One key at a time: the number inputs re-render on each change and can drop a key sent in a burst
        # (a "." typed while "2" was being rendered: 25 instead of 2.5).
        for key in text:
            field.send_keys(key)
        if field.get_attribute("value") == text:
            break
    field.send_keys(Keys.TAB)  # leave the field as a person does (a scripted blur() is not always seen)


def snap(browser: WebDriver, name: str, element: WebElement | None = None, height: int | None = None) -> None:
    """With ``AIRFLOW_COMET_SCREENSHOTS`` set, save a small PNG (256 colours) of the page's top ``height`` pixels,
    or of all of ``element`` (the window grows to hold it meanwhile)."""
    if not SCREENSHOTS:
        return
    from io import BytesIO

    from PIL import Image

    if element is None:
        png = browser.get_screenshot_as_png()
    else:
        size = browser.get_window_size()
        browser.set_window_size(size["width"], 2400)
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
        png = element.screenshot_as_png
        browser.set_window_size(size["width"], size["height"])
    image = Image.open(BytesIO(png)).convert("RGB")
    if height:
        image = image.crop((0, 0, image.width, min(height, image.height)))
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(Path(SCREENSHOTS) / name, optimize=True)
