"""The command line's failure paths: one line naming the cause, a distinct exit code (usage 2,
input or configuration 3, run time 1), no traceback, no retry wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cxr_screen(*args: str, cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "CXR_STACK_DIR")}
    env.update(environment, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def tiny_store(folder: Path) -> str:
    """An untrained 32 px model registered as production: enough to get past resolving the model."""
    import hashlib

    from model.bundle import ModelCard, model_to_bytes
    from model.network import build_classifier
    from model.preprocessing import Preprocessing
    from store import registry

    data = model_to_bytes(build_classifier(2, 32, None))
    card = ModelCard(version="v-cli", classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing=Preprocessing(input_size=32).to_dict(), weights={"origin": "none"},
                     dataset={}, metrics={}, model_sha256=hashlib.sha256(data).hexdigest())
    registry.publish(str(folder), card.version, {"model.keras": data}, card)
    registry.set_production(str(folder), card.version, "test")
    return str(folder)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


def assert_one_clear_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    (line,) = error_lines(result)
    text = " ".join(output[output.index(line):].split())  # rich wraps long lines
    for word in words:
        assert word in text, output


def test_version(tmp_path):
    from importlib.metadata import version

    result = cxr_screen("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"cxr-screen {version('cxr-screen')}"


@pytest.mark.parametrize("options, words", [
    (["--chunk-size", "0"], ["--chunk-size", "greater than or equal to 1"]),
    (["--workers", "2", "--dask-address", "tcp://scheduler:8786"], ["exclude each other"]),
    (["--engine", "fp16"], ["--engine"]),
])
def test_a_bad_option_is_a_usage_error_before_prefect_starts(tmp_path, options, words):
    result = cxr_screen("screen", str(tmp_path), *options, cwd=tmp_path)
    assert_one_clear_line(result, 2, *words)
    assert "temporary server" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("incoming, words", [
    # A missing folder takes the same path (tests/test_screen_flow.py: no retry, no traceback), and
    # no production model is exit 3 in tests/test_leftovers.py.
    ("gs://bucket/incoming", ["gs://bucket/incoming", "unsupported scheme"]),
])
def test_a_bad_location_is_an_input_error_at_once(tmp_path, incoming, words):
    store = tiny_store(tmp_path / "models")  # to get as far as listing the inputs
    started = time.monotonic()
    result = cxr_screen("screen", incoming.format(tmp=tmp_path), "--results", str(tmp_path / "results"),
                        "--model-store", store, cwd=tmp_path, PREFECT_HOME=str(tmp_path / "prefect"))
    assert_one_clear_line(result, 3, *words)
    assert time.monotonic() - started < 90  # a retry would add 2 x 10 s of waiting on top of the start


@pytest.mark.parametrize("command", [["retrain"], ["dataset-updated", "s3://cxr/datasets/other"], ["deploy"]])
def test_commands_that_need_a_server_say_so_without_one(tmp_path, command):
    result = cxr_screen(*command, cwd=tmp_path)
    assert_one_clear_line(result, 3, "no Prefect API", "stack up")
    unreachable = cxr_screen(*command, cwd=tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert_one_clear_line(unreachable, 3, "http://127.0.0.1:9/api", "does not answer")


@pytest.mark.slow
def test_screen_reads_the_settings_file_and_prints_one_json_object(tmp_path):
    import json

    from store.phantoms import write_phantom_dataset

    incoming = write_phantom_dataset(str(tmp_path / "incoming"), per_class=2, size=64, seed=1)
    store = tiny_store(tmp_path / "models")
    (tmp_path / "cxr.env").write_text(f"CXR_RESULTS={tmp_path / 'from-file'}\nCXR_MODEL_STORE={store}\n"
                                      "CXR_SCREEN_ENGINE=bf16\n")
    # The environment beats the file, as it does for the deployments' settings.
    result = cxr_screen("screen", str(tmp_path / "incoming"), "--json", cwd=tmp_path, CXR_SCREEN_ENGINE="fp32",
                        PREFECT_HOME=str(tmp_path / "prefect"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is the one object; the rest went to stderr
    assert summary["screened"] == len(incoming) and summary["engine"] == "fp32"
    assert summary["outputs"]["report.html"].startswith(str(tmp_path / "from-file"))


def test_dataset_json(tmp_path):
    import json

    from store.phantoms import write_phantom_dataset

    write_phantom_dataset(str(tmp_path / "data"), per_class=8, size=64, seed=2)
    result = cxr_screen("dataset", str(tmp_path / "data"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["images"] == sum(counts["images"] for counts in described["classes"].values()) > 0


def test_a_missing_settings_file_named_by_cxr_settings_is_refused(tmp_path):
    result = cxr_screen("dataset", str(tmp_path), cwd=tmp_path, CXR_SETTINGS=str(tmp_path / "nope.env"))
    assert result.returncode != 0 and "nope.env" in result.stderr


# Options generated from the parameter models (cli/options.py): a default, a bound and a help text
# are written once, in flows/parameters.py.

MODEL_COMMANDS = {"train": "TrainParameters", "screen": "ScreenParameters", "evaluate": "EvaluateParameters",
                  "synthesize": "SynthesizeParameters", "audit": "AuditParameters"}
# The audit's folds train as 'train' does; these training settings are deliberately not its options.
AUDIT_NOT_OPTIONS = {"model_store_uri", "multiclass", "fine_tune_epochs", "test_fraction", "target_sensitivity",
                     "augment_head", "horizontal_flip", "class_weights", "scale_mode", "force_promote",
                     "require_approval", "strata", "max_strata", "balance_strata", "mixed_strata_only", "leave_out", "calibrate",
                     "head", "bootstrap", "min_auc", "min_specificity", "acceptance_bound", "synthetic_uri",
                     "synthetic_share", "scope_pass_rate", "scope_negatives_uri", "dataset_prefixes"}


def click_command(name: str):
    from typer.main import get_command

    from cli.main import app

    return get_command(app).commands[name]


def invoke(*args: str):
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, list(args), terminal_width=200)


@pytest.mark.parametrize("command, model_name", MODEL_COMMANDS.items())
def test_every_field_is_an_option_with_the_models_default_and_description(command, model_name):
    from flows import parameters

    model = getattr(parameters, model_name)
    found = {param.name: param for param in click_command(command).params}
    left_out = set(model.model_fields) - set(found)
    assert left_out == (AUDIT_NOT_OPTIONS if command == "audit" else set())
    for name, field in model.model_fields.items():
        if name in left_out:
            continue
        param = found[name]
        expected = None if field.default_factory else field.default
        assert param.required == field.is_required(), name
        if not field.is_required():
            assert param.default == expected, name
        assert param.help in (field.description, f"COL[,COL]: {field.description}", f"URI[,URI]: {field.description}"), name


def test_help_shows_the_models_description_and_default(monkeypatch):
    from flows.parameters import ScreenParameters, TrainParameters

    monkeypatch.setenv("COLUMNS", "200")

    def line_of(text: str, option: str) -> str:
        return next(line for line in text.splitlines() if f" {option} " in line)

    train_help = invoke("train", "--help")
    assert train_help.exit_code == 0, train_help.output
    for field, option in [("batch_size", "--batch-size"), ("seed", "--seed"), ("fine_tune_epochs", "--fine-tune-epochs")]:
        line = line_of(train_help.output, option)
        assert TrainParameters.describe(field) in line and f"[default: {TrainParameters.default(field)}]" in line
    line = line_of(train_help.output, "--model-store")  # a location: the option drops _uri
    assert "Model store (folder or s3://)." in line and "[default: models]" in line
    assert "--calibrate" in train_help.output and "--no-calibrate" in train_help.output  # on by default: a pair
    screen_help = invoke("screen", "--help")
    line = line_of(screen_help.output, "--chunk-size")
    assert ScreenParameters.describe("chunk_size") in line and "[default: 256]" in line
    assert "env var: CXR_SCREEN_CHUNK_SIZE" in screen_help.output


@pytest.mark.parametrize("args, words", [
    (["train", "data", "--batch-size", "0"], ["--batch-size", "greater than or equal to 1"]),
    (["train", "data", "--test-fraction", "1"], ["--test-fraction", "less than 1"]),
    (["train", "data", "--head", "forest"], ["--head", "'linear' or 'mlp'"]),
    (["train", "data", "--leave-out", "sex"], ["--leave-out", "pattern"]),
    (["train", "data", "--synthetic-share", "0.3"], ["--synthetic-share", "only with --synthetic"]),
    (["evaluate", "data", "--where", "sex"], ["--where", "'sex'"]),
    (["synthesize", "data", "--out", "o", "--image-size", "100"], ["--image-size", "64, 128 or 256"]),
    (["audit", "data", "--by", "site", "--epochs", "0"], ["--epochs"]),
])
def test_a_bad_value_is_a_usage_error_naming_the_option(args, words):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    text = " ".join(result.output[result.output.index(line):].split())
    assert all(word in text for word in words), text


def test_a_bad_value_from_the_environment_names_its_variable(monkeypatch):
    monkeypatch.setenv("CXR_TRAIN_EPOCHS", "0")
    result = invoke("train", "data")
    assert result.exit_code == 2 and "--epochs (from CXR_TRAIN_EPOCHS)" in " ".join(result.output.split())


def test_only_what_was_given_reaches_the_model():
    import typer
    from typer.testing import CliRunner

    from cli.options import OptionSpec, parameters_command
    from flows.parameters import EvaluateParameters

    seen = {}

    @parameters_command(EvaluateParameters, arguments=["dataset_uri"],
                        specs={"strata": OptionSpec(comma_separated="COL[,COL]"), "seed": OptionSpec(envvar="TEST_SEED")})
    def evaluate(params: EvaluateParameters, as_json: bool = typer.Option(False, "--json")) -> None:
        seen.update(params=params, as_json=as_json)

    app = typer.Typer()
    app.command()(evaluate)
    app.command()(lambda: None)  # two commands, so that the name is needed
    result = CliRunner().invoke(app, ["evaluate", "site", "--strata", "sex, view", "--where", "sex=F", "--where",
                                      "view=PA", "--model-store", "s3://b/models", "--json"], env={"TEST_SEED": "7"})
    assert result.exit_code == 0, result.output
    params = seen["params"]
    assert seen["as_json"] is True
    assert params.strata == ["sex", "view"] and params.where == ["sex=F", "view=PA"] and params.seed == 7
    assert params.model_store_uri == "s3://b/models"
    assert params.model_fields_set == {"dataset_uri", "strata", "where", "model_store_uri", "seed"}
    assert params.bootstrap == EvaluateParameters.default("bootstrap")
    with pytest.raises(ValueError, match="no field"):
        parameters_command(EvaluateParameters, specs={"stratum": OptionSpec()})
