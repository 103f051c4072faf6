"""``make demo`` as a newcomer sees it: one screen, not pages of log records, ending with where the images are."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

#: What the issue asks of a first run: about 40 lines at most.
MAX_LINES = 40


def test_demo_prints_one_screen_and_ends_with_the_images(tmp_path):
    output = tmp_path / "output"
    env = {k: v for k, v in os.environ.items() if k != "COMETAPI_KEY"}
    env["AIRFLOW_COMET_DEMO_OUTPUT"] = str(output)
    result = subprocess.run(
        [sys.executable, "-m", "airflow_comet.demo"], env=env, capture_output=True, text=True, timeout=600
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) <= MAX_LINES, result.stdout
    assert result.stderr.strip() == "", result.stderr
    assert "simulator" in lines[1]
    # Airflow's own records went to the log file named on the screen, not to the terminal.
    log_line = next(line for line in lines if "Airflow's log:" in line)
    log_path = Path(log_line.split("Airflow's log:", 1)[1].strip())
    assert log_path.stat().st_size > 0
    assert not any("[info" in line.lower() or " INFO " in line for line in lines), result.stdout
    # Progress for each task, then the folder, the first image on its own line and the manifest.
    assert any(re.search(r"\] generate +1 success$", line) for line in lines), result.stdout
    assert any(re.search(r"\] +predictions +4/4 succeeded, 0 failed, 0 running, 0 waiting", line) for line in lines), (
        result.stdout
    )
    assert lines[-6].startswith("Run succeeded") and "4 succeeded" in lines[-6]
    folder = Path(lines[-5].strip())
    first_image = Path(lines[-3].strip())
    manifest = Path(lines[-1].strip())
    assert lines[-4] == "First image:" and first_image.is_file() and first_image.parent == folder
    assert manifest.is_file() and manifest.parent == folder and folder.is_relative_to(output)
    assert len(list(folder.glob("*.webp"))) == 4
