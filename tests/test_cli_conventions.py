"""Command-line conventions (issue 14): one-line errors, results alone on stdout, quiet by
default, progress with counts and ETA, and one parser convention for every command."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import s3_server

from sisa_ray import executor
from sisa_ray.cli import build_parser, main
from sisa_ray.cli.common import Progress, progress_mode
from sisa_ray.core.config import ResourceConfig

s3_service, s3 = s3_server.s3_service, s3_server.s3  # the S3 server fixtures, used here


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(*argv, env=None, cwd=None, timeout=600):
    """``python -m sisa_ray ...`` as a user runs it."""
    full = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sisa_ray", *argv], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=timeout)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


# -- the parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_and_its_default_is_shown(command):
    p = subcommands()[command]
    assert not p.allow_abbrev
    text = p.format_help()
    for action in options(p):
        assert action.help, f"{command} {action.option_strings} has no help text"
        shown = action.default is not None and action.default is not False \
            and action.default is not argparse.SUPPRESS
        if shown and "default" not in action.help.lower():
            flat = " ".join(text.split())
            assert f"(default: {action.default})" in flat, (command, action.option_strings)


def test_defaults_are_shown_in_help_text():
    flat = " ".join(subcommands()["train"].format_help().split())
    assert "--shards SHARDS shards S (independent models) (default: 8)" in flat
    assert "--cpus-per-shard CPUS_PER_SHARD" in flat and "(default: 0.0)" in flat
    # no default to show: nothing appended
    assert "(default: None)" not in flat and "(default: False)" not in flat


def test_the_same_option_has_the_same_default_in_every_command():
    """Options shared by commands agree, except where bench's description says why not."""
    cmds = subcommands()
    bench_doc = " ".join(cmds["bench"].description.split())
    documented = {"--dataset": "Fashion-MNIST", "--model": "cnn", "--batch-size": "batch 64"}
    seen: dict[str, tuple[str, object]] = {}
    for name in ("train", "delete", "predict", "status", "verify", "recover", "serve", "bench"):
        for action in options(cmds[name]):
            opt = action.option_strings[-1]
            if opt in seen and seen[opt][1] != action.default:
                assert name == "bench", (opt, seen[opt], name, action.default)
                if action.default is None:  # the preset's value, as its help says
                    assert "(default: the preset's)" in action.help, opt
                else:
                    assert opt in documented, (opt, seen[opt], name, action.default)
                    assert documented[opt] in bench_doc and "unlike train" in bench_doc
            seen.setdefault(opt, (name, action.default))
    assert "--seed" in seen and "--address" in seen and "--max-concurrent" in seen


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sisa-ray {version('sisa-ray')}"


def test_verbose_is_accepted_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["status", "--store", "s", "-v"]).verbose is True
    assert parser.parse_args(["-v", "status", "--store", "s"]).verbose is True
    assert parser.parse_args(["status", "--store", "s"]).verbose is False
    assert parser.parse_args(["bench", "--verbose"]).verbose is True


def test_no_abbreviations_and_usage_errors_are_one_line(tmp_path):
    res = cli("train", "--store", str(tmp_path / "s"), "--backend", "local", "--stor", "x",
              cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("sisa-ray: error: unrecognized arguments: --stor x "
                          "(see sisa-ray --help)\n")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--shards", "a,b"], "argument --shards: expected comma-separated integers >= 1 such as "
                          "1,2,4; got 'a,b'"),
    (["--slices", "1,0"], "argument --slices: every value must be >= 1; got '1,0'"),
    (["--requests", "0"], "argument --requests: must be >= 1; got 0"),
    (["--backend", "local"], "unrecognized arguments: --backend local"),
    (["--dataset", "diabetes"], "argument --dataset: invalid choice: 'diabetes'"),
])
def test_bench_refuses_bad_options_by_name_before_running(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("sisa_ray.bench.run_bench", _must_not_run)
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def _must_not_run(*a, **k):
    raise AssertionError("the benchmark started although an option was invalid")


@pytest.mark.parametrize("argv, message", [
    (["--requests", "50", "--max-train", "100"],
     r"--requests 50: .* from --max-train 100 samples. Use --requests 47 or less"),
    (["--mlflow-uri", "sqlite:///x.db", "--no-mlflow"], "contradict each other"),
    (["--mlflow-uri", "sqlite:////no/such/dir/m.db"], r"the directory /no/such/dir does not exist"),
    (["--out", __file__], "is a file; give a directory"),
    (["--max-concurrent", "0"], "max_concurrent"),
    (["--gpus-per-shard", "-1"], "num_gpus"),
    (["--micro-batches", "2", "--threads", "2"], r"'micro_batches' .* needs threads=1"),
    (["--model", "wide_cnn", "--micro-batches", "2"], r"'wide_cnn': its batch norm"),
])
def test_bench_checks_options_that_span_each_other_before_running(capsys, monkeypatch, argv,
                                                                    message):
    monkeypatch.setattr("sisa_ray.bench.run_bench", _must_not_run)
    code, out, err = run(capsys, "bench", *argv)
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err


def test_bench_checks_the_data_before_ray_starts(capsys, monkeypatch):
    """digits has 1437 training samples: 2 x 800 victims cannot be drawn; Ray never starts."""
    started = []
    monkeypatch.setattr(executor, "ensure_ray", lambda *a, **k: started.append(a))
    code, _, err = run(capsys, "bench", "--dataset", "digits", "--requests", "800", "--no-mlflow",
                       "--quiet")
    assert code == 2 and "deletes 2 x 800 ids" in err and "Use --requests 716 or less" in err
    assert started == []


def test_bench_joins_the_cluster_given_by_address(capsys, monkeypatch):
    joined = []

    def ensure_ray(*args, **kwargs):
        joined.append(args)
        raise ConnectionError("stop here")

    monkeypatch.setattr(executor, "ensure_ray", ensure_ray)
    code, _, err = run(capsys, "bench", "--dataset", "digits", "--address", "10.0.0.1:6379",
                       "--no-mlflow", "--quiet")
    assert code == 3 and "stop here" in err and joined == [("10.0.0.1:6379",)]


def test_bench_honours_the_resource_options(monkeypatch):
    from sisa_ray import bench

    args = build_parser().parse_args(
        ["bench", "--cpus-per-shard", "2", "--gpus-per-shard", "0.5", "--max-concurrent", "3",
         "--address", "10.0.0.1:6379", "--shards", "2,4", "--slices", "1", "--threads", "2"])
    spec = bench.spec_from_args(args)
    assert spec.resources == ResourceConfig(num_cpus=2.0, num_gpus=0.5, max_concurrent=3)
    assert spec.threads == 2
    assert spec.address == "10.0.0.1:6379" and spec.shards == [2, 4] and spec.slices == [1]
    made = {}

    class Recorder:
        def __init__(self, config, **kwargs):
            made.update(kwargs)

        def fit(self, train, test):
            return self

    monkeypatch.setattr("sisa_ray.ensemble.SISAEnsemble", Recorder)
    with bench._pool(spec) as pool:  # the bench's one pool of workers carries them
        assert (pool.resources, pool.address) == (spec.resources, "10.0.0.1:6379")
        bench._fit(None, None, None, "store", spec, pool)
    assert made == {"store": "store", "backend": "ray", "address": "10.0.0.1:6379",
                    "resources": spec.resources, "executor": pool}


# -- one-line failures ----------------------------------------------------------------------------


def test_an_unexpected_failure_is_one_line_and_exit_3(capsys, monkeypatch):
    from sisa_ray.cli import store

    def boom(args):
        raise RuntimeError("it broke\nsecond line\nthird")

    monkeypatch.setattr(store, "cmd_status", boom)
    code, out, err = run(capsys, "status", "--store", "s")
    assert (code, out) == (3, "")
    assert err == "sisa-ray: error: RuntimeError: it broke (more with -v)\n"
    code, out, err = run(capsys, "status", "--store", "s", "--json")
    assert code == 3 and json.loads(out) == {"error": "RuntimeError: it broke (more with -v)",
                                             "type": "RuntimeError"}
    code, _, err = run(capsys, "status", "--store", "s", "-v")
    assert code == 3 and "Traceback" in err and err.endswith("sisa-ray: error: RuntimeError: "
                                                             "it broke (more with -v)\n")


def test_a_missing_s3_bucket_is_one_line(capsys, s3):
    uri = s3.uri(bucket="no-such-bucket")
    code, out, err = run(capsys, "train", "--store", uri, "--backend", "local", "--epochs", "1",
                         "--shards", "2", "--slices", "1", "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("sisa-ray: error: ") and "'no-such-bucket' does not exist" in err


def test_a_gcs_store_that_cannot_be_reached_times_out_in_one_line(capsys, monkeypatch):
    """No credentials and no network: pyarrow retries for 15 minutes unless told otherwise."""
    from sisa_ray.core import store

    assert "retry_time_limit': datetime.timedelta(seconds=20)" in repr(
        store.Store("gs://b/x").fs.__reduce__())
    assert store._with_retry_limit("gs://b/x?retry_limit_seconds=3") == \
        "gs://b/x?retry_limit_seconds=3"
    assert store._with_retry_limit("gs://b/x?project_id=p") == \
        "gs://b/x?project_id=p&retry_limit_seconds=20"
    monkeypatch.setattr(store, "GCS_RETRY_LIMIT_S", 1)
    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA_HOST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # nothing answers there
    code, out, err = run(capsys, "status", "--store", "gs://no-such-bucket-sisa/x",
                         "--backend", "local")
    assert code == 3 and out == "" and err.count("\n") == 1, err
    assert err.startswith("sisa-ray: error: ") and "no-such-bucket-sisa" in err
    assert err.endswith("Check the path or bucket name, the credentials and the network (a store "
                        "or cluster could not be reached)\n")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_in_one_line_without_ray_init(monkeypatch):
    import ray

    port = _closed_port()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _must_not_run)
    with pytest.raises(executor.ClusterUnreachable,
                       match=rf"cluster at 127.0.0.1:{port} .* does not answer"):
        executor.ensure_ray(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(executor.ClusterUnreachable, match="does not answer"):
        executor.ensure_ray()


def test_an_unreachable_address_on_the_command_line(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert run(capsys, "train", "--store", store, "--backend", "local", "--shards", "2",
               "--slices", "1", "--epochs", "1", "--quiet")[0] == 0
    port = _closed_port()
    res = cli("delete", "--store", store, "--ids", "3", "--address", f"127.0.0.1:{port}")
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and re.match(
        rf"sisa-ray: error: The Ray cluster at 127.0.0.1:{port} \(\S+:{port}\) does not answer "
        r"\(Connection refused\) within 5s. Check --address", res.stderr), res.stderr


def test_ray_is_quiet_unless_verbose(monkeypatch):
    import logging

    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    executor.ensure_ray(verbose=False)
    executor.ensure_ray(verbose=True)
    assert [(c["log_to_driver"], c["logging_level"]) for c in calls] == \
        [(False, logging.ERROR), (True, logging.INFO)]
    assert all(c["address"] == "local" for c in calls)  # never a cluster that happens to run


@pytest.mark.ray
def test_worker_start_up_failures_are_one_line(ray_session):
    # defined here, so that Ray ships them by value to workers that cannot import tests/
    class Failing:
        def __init__(self, *args):
            raise ValueError("the worker refuses")

        def ping(self):
            return None

    class Slow:
        def __init__(self, *args):
            time.sleep(60)

        def ping(self):
            return None

    ex = executor.RayExecutor(worker_cls=Failing, max_restarts=0)
    ex.bind("/nonexistent-store", 1)
    with pytest.raises(RuntimeError, match=r"^A shard worker failed to start: .*the worker "
                                           r"refuses") as e:
        ex._start([0])
    assert "\n" not in str(e.value) and ex._workers == {}

    ex = executor.RayExecutor(worker_cls=Slow, startup_timeout_s=1.0)
    ex.bind("/nonexistent-store", 1)
    with pytest.raises(executor.WorkerStartTimeout, match=r"did not start within 1s \(each asks "
                                                          r"for 0.001 CPU, 0 GPU"):
        ex._start([0])
    assert ex._workers == {}

    # refused at once; the short time-out only bounds this test should the check be missing
    ex = executor.RayExecutor(ResourceConfig(num_cpus=64), startup_timeout_s=5.0)
    ex.bind("/nonexistent-store", 1)
    with pytest.raises(ValueError, match=r"--cpus-per-shard 64: .* offers at most 2 per node"):
        ex._start([0])
    ex = executor.RayExecutor(ResourceConfig(num_gpus=1), startup_timeout_s=5.0)
    ex.bind("/nonexistent-store", 1)
    with pytest.raises(ValueError, match=r"--gpus-per-shard 1: .* offers at most 0 per node"):
        ex._start([0])


# -- stdout is for results ------------------------------------------------------------------------


def test_stdout_holds_the_result_only(capsys, monkeypatch):
    """What a library prints while a command runs goes to stderr."""
    from sisa_ray.cli import common, store

    def noisy(args):
        print("(raylet) a warning on stdout")
        common._emit(args, {"ok": 1}, "done")
        return 0

    monkeypatch.setattr(store, "cmd_status", noisy)
    code, out, err = run(capsys, "status", "--store", "s", "--json")
    assert code == 0 and json.loads(out) == {"ok": 1} and "(raylet) a warning" in err


def test_stdout_holds_the_result_only_at_the_file_descriptor_level():
    code = ("import os, sys\n"
            "from sisa_ray.cli.common import results_stream\n"
            "with results_stream() as out:\n"
            "    os.write(1, b'from C code\\n')\n"
            "    print('from Python')\n"
            "    print('{\"ok\": 1}', file=out)\n"
            "print('after')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout == '{"ok": 1}\nafter\n'
    assert res.stderr == "from C code\nfrom Python\n"


@pytest.mark.ray
@pytest.mark.slow
def test_json_output_of_a_ray_run_is_strict_json_and_ray_is_quiet(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert run(capsys, "train", "--store", store, "--backend", "local", "--shards", "2",
               "--slices", "1", "--epochs", "1", "--quiet")[0] == 0
    res = cli("verify", "--store", store, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["identical"] is True  # the whole of stdout is the document
    for noise in ("Started a local Ray instance", "Token authentication", "raylet", "WARNING"):
        assert noise not in res.stderr and noise not in res.stdout


def test_mlflow_table_creation_messages_only_with_verbose(tmp_path):
    code = ("import sys\n"
            "from sisa_ray.cli import _configure_output\n"
            "_configure_output(sys.argv[1] == 'v')\n"
            "import mlflow\n"
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path}/' + sys.argv[1] + '.db')\n"
            "mlflow.search_experiments()\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True,
                           env=env, check=True)
    loud = subprocess.run([sys.executable, "-c", code, "v"], capture_output=True, text=True,
                          env=env, check=True)
    assert "Creating initial MLflow database tables" in loud.stderr
    assert quiet.stderr == "" and quiet.stdout == ""


# -- progress --------------------------------------------------------------------------------------


def test_progress_mode():
    class Args:
        json = False
        quiet = False

    assert progress_mode(Args) == "lines"  # stderr is not a terminal under pytest
    Args.quiet = True
    assert progress_mode(Args) == "none"
    Args.quiet, Args.json = False, True
    assert progress_mode(Args) == "none"


def test_progress_lines_have_counts_and_eta(capsys):
    p = Progress("train", "lines")
    p({"shard": 3, "done": 1, "total": 4, "start_step": 2, "sample_steps": 100, "seconds": 0.5})
    err = capsys.readouterr().err
    assert re.fullmatch(r"  train:  25% 1/4 \[00:00<00:0\d, +[\d.]+shard/s\]  shard 3 from slice "
                        r"2, 100 sample-steps in 0.50s\n", err), err


def test_progress_bar_on_a_terminal(capsys):
    p = Progress("retrain", "bar")
    for done in (1, 2):
        p({"shard": done, "done": done, "total": 2, "sample_steps": 10, "seconds": 0.1})
    err = capsys.readouterr().err
    assert "retrain: 100%" in err and "2/2 [" in err and p._bar is None  # closed at the end


def test_compare_counts_each_stage_with_a_bar_on_a_terminal(capsys):
    from types import SimpleNamespace

    from sisa_ray.cli.compare import _bar
    from tune.compare import TrialProgress

    tell = _bar("seeds with their models trained", 3)
    for n in (1, 2, 3):
        tell(n)
    err = capsys.readouterr().err
    assert "[compare] seeds with their models trained: 100%" in err and "3/3 [" in err
    seen = []
    tracker = SimpleNamespace(trial_finished=lambda *a: None)
    trials = TrialProgress(tracker, 2, print,
                           lambda label, total: lambda n: seen.append((label, n, total)))
    trials.trial_finished("a", None)
    trials.trial_finished("b", "boom")
    assert seen == [("Tune trials ended", 1, 2), ("Tune trials ended", 2, 2)]


def test_the_start_line_waits_so_a_quick_failure_is_one_line(capsys):
    p = Progress("train", "lines")
    p.announce("starting Ray workers", delay_s=0.0)
    time.sleep(0.5)
    assert capsys.readouterr().err == "train: starting Ray workers\n"
    p = Progress("train", "lines")
    p.announce("starting Ray workers", delay_s=0.3)
    p.close()  # e.g. the command failed at once
    time.sleep(0.6)
    assert capsys.readouterr().err == ""
    p = Progress("train", "lines")
    p.announce("starting Ray workers", delay_s=0.3)
    p.update(1, 2)  # the first count came first: no start line after it
    time.sleep(0.6)
    assert "starting" not in capsys.readouterr().err
    p = Progress("train", "none")
    p.announce("starting Ray workers", delay_s=0.0)
    time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_bench_shows_progress_per_stage(capsys, monkeypatch):
    def fake_run_bench(spec, out, mlflow_uri=None, say=print, progress=None):
        say("[bench] a status line")
        for done in (1, 2, 3):
            progress(done, 3, f"stage {done}")
        raise RuntimeError("stop here")

    monkeypatch.setattr("sisa_ray.bench.run_bench", fake_run_bench)
    code, _, err = run(capsys, "bench", "--no-mlflow")
    assert code == 3
    assert "[bench] a status line" in err and "bench: 100% 3/3 [" in err and "stage 3" in err
    assert "stop here" in err.splitlines()[-1]
    code, _, err = run(capsys, "bench", "--no-mlflow", "--quiet")
    assert err == "sisa-ray: error: RuntimeError: stop here\n"


# -- the local writer lock is filelock's ------------------------------------------------------------


def test_local_writer_lock_excludes_other_handles_threads_and_processes(tmp_path):
    import signal
    import threading

    from sisa_ray.core.store import LOCK_FILE, LocalLock, LockTimeout, Store

    path = str(tmp_path / "s")
    lock = LocalLock(Store(path), timeout=0.1)
    with lock:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            lock.__enter__()
        with pytest.raises(LockTimeout, match=rf"{re.escape(path)} is locked by another"):
            with LocalLock(Store(path), timeout=0.1):
                pass
        seen = []

        def other_thread():
            try:
                with LocalLock(Store(path), timeout=0.1):
                    seen.append("acquired")
            except LockTimeout:
                seen.append("excluded")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen == ["excluded"]
    assert os.path.exists(os.path.join(path, LOCK_FILE))  # kept: the store's contents stay put
    with LocalLock(Store(path), timeout=0):
        pass
    # a holder killed with SIGKILL releases the lock at once
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sisa_ray.core.store import LocalLock, Store\n"
         f"with LocalLock(Store({path!r})):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockTimeout):
            with LocalLock(Store(path), timeout=0.1):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with LocalLock(Store(path), timeout=10):
        pass
