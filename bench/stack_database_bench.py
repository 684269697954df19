"""How long do the nightly run's task-run updates take at the Prefect API, on SQLite and on PostgreSQL? (#25)

For each database in turn, a real Prefect server (``prefect server start`` on 127.0.0.1; SQLite in
a temporary PREFECT_HOME, then PostgreSQL started by deployments/postgres.py as the stack starts it)
takes the same load, and is stopped before the next starts:

(a) the API path: --writers processes at once, as the stack's Dask workers, the flow and a retrain
    write. Each has its own client and, one after another, creates --task-runs task runs (Pending)
    and sets each Running then Completed with ``set_task_run_state``; every set is timed (a
    "task-run update"), and every create. The last writer's task runs belong to a "retrain" flow run, the others' to
    the "nightly" one, both Running. A few updates per writer first warm its connections, uncounted.
(b) the engine's path: Prefect 3.9.1's task engine does not call that endpoint. A task run's
    states go out as events (``/api/events/in``) that the server's task-run recorder writes to the
    database later. So each writer process also runs a real flow of --task-runs tasks, and the
    bench times the flows and how long after their start the server holds every one of those task
    runs as Completed: the database's cost shows there, not in the flows' own time.

Printed: the machine, Prefect's and PostgreSQL's versions, then per database and call (update,
create): the calls, errors (exceptions and refused states), the 503s Prefect's client retried
(the server answers SQLite's "database is locked" with 503, and the client waits 2, 4, 8 ... s
before it tries again, within the timed call), median, p95 and max latency, and calls per second
(all writers' calls over the span from the first writer's start to the last one's end), with
PostgreSQL / SQLite for each; then (b)'s figures, and the retryable database errors in the server's
log (it runs with PREFECT_SERVER_LOG_RETRYABLE_ERRORS). --out writes them as JSON.

The writers, the Prefect server and PostgreSQL share this machine's cores, as on a one-machine stack.

    .venv/bin/python bench/stack_database_bench.py                              # 4 x 50: 1.5-3 min on 2 cores
    .venv/bin/python bench/stack_database_bench.py --writers 2 --task-runs 20   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if "PREFECT_HOME" not in os.environ:  # the writer processes inherit the parent's
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cxr-bench-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import prefect
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Running

from bench.machine import cpu_line
from deployments import postgres

WARM_UP = 3  # task runs per writer, before the barrier, not counted
RECORD_TIMEOUT = 300  # seconds (b) waits for the recorder, from the flows' submission
ENGINE_TAG = "bench-engine-path"


@task
def screen_chunk(index: int) -> int:
    return index


@flow
def bench_nightly(task_runs: int) -> None:
    for index in range(task_runs):
        screen_chunk(index)


@flow
def bench_retrain() -> None:
    pass


# --- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
    """``process`` stopped (``first`` to it alone, then SIGKILL to its group); it leads its own group."""
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # children left behind (uvicorn's, postgres')
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def started(command: list[str], log: Path, environment: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
                                start_new_session=True)


@contextlib.contextmanager
def prefect_server(home: Path, database_url: str | None) -> Iterator[tuple[str, Path]]:
    """A Prefect server on 127.0.0.1 (SQLite in ``home`` unless ``database_url``): its API URL and log."""
    home.mkdir(parents=True)
    port, log = free_port(), home / "server.log"
    # The parent's Prefect settings (an API URL, another database) must not leak into the server.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    environment.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true")  # counted from its log
    if database_url:
        environment["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    process = started([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      log, environment)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {process.returncode}; see {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not answer within 180 s; see {log}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/api", log
    finally:
        stop(process)


@contextlib.contextmanager
def postgres_server(folder: Path) -> Iterator[str]:
    """PostgreSQL on 127.0.0.1, as the stack runs it (deployments/postgres.py): Prefect's connection URL."""
    password, data, port, log = secrets.token_urlsafe(24), folder / "data", free_port(), folder / "postgres.log"
    folder.mkdir(mode=0o700, parents=True)
    postgres.initialize(data, password)
    process = started(postgres.as_started(postgres.server_command(data, port)), log)
    try:
        postgres.wait_until_ready(password, port, process, log)
        yield postgres.connection_url(password, port)
    finally:
        stop(process, signal.SIGINT)  # PostgreSQL's fast shutdown: SIGTERM would wait for every client


def postgres_version() -> str:
    program = postgres.server_command(Path("unused"), 0)[0]
    return subprocess.run([program, "--version"], capture_output=True, text=True, check=True).stdout.strip()


# --- the writers, one process each -------------------------------------------------------------

_barrier = None


def _share(barrier) -> None:
    global _barrier
    _barrier = barrier


def api_writer(api: str, flow_run_id: str, task_runs: int) -> dict:
    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(_api_writer(flow_run_id, task_runs))


async def _api_writer(flow_run_id: str, task_runs: int) -> dict:
    timed = {"update": [], "create": []}
    errors = {"update": collections.Counter(), "create": collections.Counter()}
    retried, counting = collections.Counter(), False  # the nested functions read counting as it is then

    async def answered(response) -> None:
        # Prefect's client retries a 503 (the server's answer to "database is locked" and to other
        # retryable database errors) after 2, 4, 8 ... s: inside the timed call, so counted apart.
        if counting and response.status_code >= 500:
            retried["update" if response.request.url.path.endswith("/set_state") else "create"] += 1

    async with get_client(httpx_settings={"event_hooks": {"response": [answered]}}) as client:

        async def call(kind: str, label: str, coroutine):
            began = time.perf_counter()
            try:
                result = await coroutine
            except Exception as error:  # noqa: BLE001 - any failure the API gives is a figure here
                if counting:
                    errors[kind][f"{label}: {type(error).__name__}: {str(error)[:100]}"] += 1
                return None
            if counting:
                timed[kind].append(time.perf_counter() - began)
            return result

        async def one(index: int) -> None:
            task_run = await call("create", "create", client.create_task_run(
                screen_chunk, flow_run_id, dynamic_key=f"{os.getpid()}-{index}"))
            for state in (Running(), Completed()) if task_run else ():
                result = await call("update", state.name, client.set_task_run_state(task_run.id, state))
                if result is not None and result.status.value != "ACCEPT" and counting:
                    errors["update"][f"{state.name}: {result.status.value} {result.details}"[:120]] += 1

        for index in range(WARM_UP):
            await one(-1 - index)
        _barrier.wait(timeout=120)
        counting = True
        # perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process: the spans compare.
        start = time.perf_counter()
        for index in range(task_runs):
            await one(index)
        return {**timed, "errors": {kind: dict(counts) for kind, counts in errors.items()}, "retried": dict(retried),
                "start": start, "end": time.perf_counter()}


def engine_writer(api: str, task_runs: int) -> dict:
    from prefect.events.worker import EventsWorker

    with temporary_settings({PREFECT_API_URL: api}):
        _barrier.wait(timeout=120)
        start = time.perf_counter()
        with prefect.tags(ENGINE_TAG):  # its task runs carry it: the parent counts them by it
            state = bench_nightly(task_runs, return_state=True)
        end = time.perf_counter()
        EventsWorker.drain_all(timeout=60)  # what is still queued goes out now, not at process exit
        return {"state": state.type.value, "start": start, "end": end}


# --- one database ------------------------------------------------------------------------------

def completed_count(api: str) -> int:
    body = json.dumps({"task_runs": {"tags": {"all_": [ENGINE_TAG]}, "state": {"type": {"any_": ["COMPLETED"]}}}}).encode()
    request = urllib.request.Request(f"{api}/task_runs/count", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


async def flow_runs(api: str) -> tuple[str, str]:
    """The nightly and the retrain flow runs, both Running as their flows would set them."""
    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            runs = [await client.create_flow_run(bench_nightly, parameters={"task_runs": 0}),
                    await client.create_flow_run(bench_retrain)]
            for run in runs:
                await client.set_flow_run_state(run.id, Running())
            return str(runs[0].id), str(runs[1].id)


def measure(api: str, log: Path, writers: int, task_runs: int) -> dict:
    nightly, retrain = asyncio.run(flow_runs(api))
    context = multiprocessing.get_context("spawn")  # no forked asyncio loops or client threads
    with ProcessPoolExecutor(writers, mp_context=context, initializer=_share,
                             initargs=(context.Barrier(writers),)) as pool:
        runs = [retrain if index == writers - 1 and writers > 1 else nightly for index in range(writers)]
        done = [future.result() for future in [pool.submit(api_writer, api, run, task_runs) for run in runs]]
        # (b): polled while the flows run, until the recorder holds every one of their task runs as Completed.
        futures, expected, recorded = [pool.submit(engine_writer, api, task_runs) for _ in range(writers)], writers * task_runs, None
        polled_from = time.perf_counter()
        while time.perf_counter() - polled_from < RECORD_TIMEOUT:
            if completed_count(api) >= expected:
                recorded = time.perf_counter()
                break
            if any(future.done() and future.exception() for future in futures):
                break  # raised below
            time.sleep(0.1)
        engine = [future.result() for future in futures]
    span = max(writer["end"] for writer in done) - min(writer["start"] for writer in done)
    calls = {}
    for kind in ("update", "create"):
        milliseconds = np.array([value for writer in done for value in writer[kind]]) * 1000
        errors = sum((collections.Counter(writer["errors"][kind]) for writer in done), collections.Counter())
        calls[kind] = {"calls": int(milliseconds.size), "errors": sum(errors.values()), "error_kinds": dict(errors.most_common(5)),
                       "retried_503": sum(writer["retried"].get(kind, 0) for writer in done),
                       "median_ms": float(np.median(milliseconds)), "p95_ms": float(np.percentile(milliseconds, 95)),
                       "max_ms": float(milliseconds.max()), "per_s": milliseconds.size / span}

    start, flows_end = min(writer["start"] for writer in engine), max(writer["end"] for writer in engine)
    server_log = log.read_text(errors="replace")
    return {
        **calls,
        "engine": {"task_runs": expected, "flows_failed": sum(writer["state"] != "COMPLETED" for writer in engine),
                   "flows_s": flows_end - start, "recorded_s": None if recorded is None else recorded - start,
                   "lag_after_flows_s": None if recorded is None else recorded - flows_end,
                   "recorded_per_s": None if recorded is None else expected / (recorded - start)},
        # Logged because the server runs with PREFECT_SERVER_LOG_RETRYABLE_ERRORS: each 503 the API
        # answered (uvicorn logs it once more), and any other error, the services' (the recorder's).
        "server_log": {"api_503": server_log.count("Encountered retryable exception in request"),
                       "other_errors": sum("| ERROR" in line and not any(known in line for known in (
                           "Encountered retryable exception in request", "Exception in ASGI application"))
                                           for line in server_log.splitlines())},
    }


# --- report ------------------------------------------------------------------------------------

def show(figures: dict[str, dict]) -> dict[str, dict[str, float]]:
    print("\n(a) through the API, all writers together: updates (set_task_run_state) and creates (create_task_run)")
    print(f"  {'database':12}{'call':>7}{'calls':>7}{'errors':>8}{'503 retried':>13}{'median ms':>11}{'p95 ms':>9}"
          f"{'max ms':>9}{'calls/s':>9}")
    for name, shown in figures.items():
        for kind in ("update", "create"):
            call = shown[kind]
            print(f"  {name:12}{kind:>7}{call['calls']:7}{call['errors']:8}{call['retried_503']:13}{call['median_ms']:11.1f}"
                  f"{call['p95_ms']:9.1f}{call['max_ms']:9.1f}{call['per_s']:9.1f}")
    ratio = {}
    for kind in ("update", "create"):
        sqlite, postgresql = figures["SQLite"][kind], figures["PostgreSQL"][kind]
        ratio[kind] = {key: postgresql[key] / sqlite[key] for key in ("median_ms", "p95_ms", "max_ms", "per_s")}
        print(f"  {'PG / SQLite':12}{kind:>7}{'':28}{ratio[kind]['median_ms']:10.2f}x{ratio[kind]['p95_ms']:8.2f}x"
              f"{ratio[kind]['max_ms']:8.2f}x{ratio[kind]['per_s']:8.2f}x")
    for name, shown in figures.items():
        for kind, count in {**shown["update"]["error_kinds"], **shown["create"]["error_kinds"]}.items():
            print(f"  {name} error x{count}: {kind}")

    print("\n(b) the task engine's path: real flows, states sent as events, written by the server's recorder")
    print(f"  {'database':12}{'task runs':>10}{'flows s':>9}{'recorded s':>12}{'lag s':>8}{'recorded/s':>12}"
          "   server log: API 503s / other errors")
    for name, shown in figures.items():
        engine, log = shown["engine"], shown["server_log"]
        recorded = (f"{engine['recorded_s']:12.1f}{engine['lag_after_flows_s']:8.1f}{engine['recorded_per_s']:12.1f}"
                    if engine["recorded_s"] is not None else f"{'not within ' + str(RECORD_TIMEOUT) + ' s':>32}")
        print(f"  {name:12}{engine['task_runs']:10}{engine['flows_s']:9.1f}{recorded}"
              f"{log['api_503']:>17} / {log['other_errors']}"
              + (f"  ({engine['flows_failed']} flows failed)" if engine["flows_failed"] else ""))
    print("  (the server log counts cover the whole run on that database, (a) and (b))")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4, help="processes writing at once (Dask workers, flow, retrain)")
    parser.add_argument("--task-runs", type=int, default=50, help="per writer; each is set Running, then Completed")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.writers < 1 or args.task_runs < 1:
        parser.error(f"--writers and --task-runs must be 1 or more, not {args.writers} and {args.task_runs}")
    postgres.require()
    print(cpu_line())
    print(f"Prefect {prefect.__version__}; {postgres_version()}; Python {sys.version.split()[0]}; "
          f"uid {os.geteuid()}{' (PostgreSQL in a user namespace)' if os.geteuid() == 0 else ''}")
    print(f"{args.writers} writer processes x {args.task_runs} task runs, {WARM_UP} more each to warm up")
    began = time.perf_counter()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-database-") as folder:
        with prefect_server(Path(folder) / "sqlite", None) as (api, log):
            figures["SQLite"] = measure(api, log, args.writers, args.task_runs)
        with postgres_server(Path(folder) / "postgres") as url, prefect_server(Path(folder) / "pg-home", url) as (api, log):
            figures["PostgreSQL"] = measure(api, log, args.writers, args.task_runs)
    ratio = show(figures)
    print(f"\nbench took {time.perf_counter() - began:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"machine": cpu_line(), "prefect": prefect.__version__,
                                        "postgres": postgres_version(), "writers": args.writers,
                                        "task_runs": args.task_runs, "databases": figures,
                                        "ratio_postgres_to_sqlite": ratio}, indent=2))


if __name__ == "__main__":
    main()
