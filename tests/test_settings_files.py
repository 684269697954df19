"""A settings file says where data goes, never which code runs (issue #22): ``CXR_PROJECT_DIR`` (the
code the process workers run), ``CXR_DASK_ADDRESS`` (the cluster that runs screening's chunks,
whose answers are unpickled) and ``CXR_STACK_DIR`` (the stack 'stack down' stops and wipes) come
from the real environment only. A file that sets one is refused with one line, by the command
line's bootstrap and by the deployments' settings alike; the rest of the file is still read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from deployments.environment_only import ENVIRONMENT_ONLY
from deployments.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_environment(monkeypatch):
    """No CXR_ variable from outside, and whatever bootstrap sets is undone afterwards."""
    saved = dict(os.environ)
    for key in [key for key in os.environ if key.startswith("CXR_")]:
        monkeypatch.delenv(key)
    yield
    os.environ.clear()
    os.environ.update(saved)


def spellings(name: str) -> list[str]:
    return [f"{name}=/somewhere/else", f"export {name}=/somewhere/else", f"{name.lower()}=/somewhere/else"]


@pytest.mark.parametrize("line", [line for name in ENVIRONMENT_ONLY for line in spellings(name)])
def test_the_bootstrap_refuses_a_settings_file_that_names_where_code_runs(tmp_path, monkeypatch, clean_environment,
                                                                          line):
    settings = tmp_path / "cxr.env"
    settings.write_text(f"CXR_RESULTS={tmp_path / 'results'}\n{line}\n")
    monkeypatch.chdir(tmp_path)  # cxr.env in the working folder, as the attack placed it
    with pytest.raises(SystemExit) as refused:
        cli._load_settings_file()
    name = line.removeprefix("export ").split("=")[0].upper()
    message = str(refused.value.code)
    assert message.startswith(f"error: cxr.env sets {name}, which is read only from the environment: "), message
    assert "\n" not in message
    assert not any(key.startswith("CXR_") for key in os.environ), "a refused file set nothing"


def test_the_environment_still_sets_them_and_the_rest_of_the_file_is_read(tmp_path, monkeypatch, clean_environment):
    (tmp_path / "cxr.env").write_text(f"CXR_RESULTS={tmp_path / 'results'}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_PROJECT_DIR", "/opt/cxr")
    monkeypatch.setenv("CXR_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    cli._load_settings_file()
    assert os.environ["CXR_RESULTS"] == str(tmp_path / "results")
    settings = Settings(_env_file="cxr.env")
    assert (settings.results, settings.project_dir, settings.dask_address) == (
        str(tmp_path / "results"), "/opt/cxr", "tcp://127.0.0.1:8786")


@pytest.mark.parametrize(("line", "name"), [("CXR_PROJECT_DIR=/tmp/planted", "CXR_PROJECT_DIR"),
                                            ("cxr_dask_address=tcp://10.0.0.9:8786", "CXR_DASK_ADDRESS"),
                                            ("CXR_STACK_DIR=/home", "CXR_STACK_DIR")])
def test_the_deployments_settings_refuse_it_too(tmp_path, monkeypatch, clean_environment, line, name):
    """What ``cli.deploy`` builds the deployments from (``flow.from_source(settings.project_dir)``)."""
    (tmp_path / "cxr.env").write_text(f"CXR_RESULTS=/data/results\n{line}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"^cxr.env sets {name}, which is read only from the environment"):
        Settings(_env_file="cxr.env")
    # Set in the environment as well: the file is still refused (it was written by someone).
    monkeypatch.setenv(name, "/opt/cxr")
    with pytest.raises(ValueError, match=f"sets {name}"):
        Settings(_env_file="cxr.env")


def test_the_command_line_refuses_the_planted_file_before_doing_anything(tmp_path):
    """The attack as shown: ``cxr.env`` in the working folder naming a project folder; and a stack
    folder, which would make 'stack down --wipe' remove another folder's data."""
    (tmp_path / "cxr.env").write_text(f"CXR_PROJECT_DIR={tmp_path / 'planted'}\nCXR_STACK_DIR=/\n")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    environment.update(PYTHONPATH=str(ROOT), COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "cli.main", "stack", "down", "--wipe"], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and done.stdout == ""
    line = ("error: cxr.env sets CXR_PROJECT_DIR (and CXR_STACK_DIR), which is read only from the environment: it "
            "names the code the process workers run. Remove it from the file; export it in the environment if you "
            "mean it")
    assert done.stderr.splitlines() == [line], done.stderr


def test_the_nightly_screening_takes_its_engine_and_explanations_from_the_settings(tmp_path, monkeypatch,
                                                                                   clean_environment):
    (tmp_path / "cxr.env").write_text("CXR_SCREEN_ENGINE=fp32\nCXR_SCREEN_EXPLAIN=all\n")
    monkeypatch.chdir(tmp_path)
    parameters = Settings(_env_file="cxr.env").screen_parameters()
    assert (parameters.engine, parameters.explain) == ("fp32", "all")
    monkeypatch.setenv("CXR_SCREEN_EXPLAIN", "none")  # the environment beats the file
    assert Settings(_env_file="cxr.env").screen_parameters().explain == "none"
    monkeypatch.delenv("CXR_SCREEN_EXPLAIN")
    assert Settings(_env_file=None).screen_parameters().explain == "flagged"  # unset: the parameters' default
