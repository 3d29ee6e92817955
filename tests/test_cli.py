"""The console script's signal handling: every command stops on SIGTERM or Ctrl-C with one line."""

import gc
import logging
import os
import signal
import subprocess
import sys

import pytest

from clipforge.cli import build_parser, chosen_parser, main, parse
from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from clipforge.progress import Progress


class SignalsWhileCollected:
    """A signal that arrives while a destructor runs (as a tokenizer's regex objects are collected during a
    model load): Python runs the handler there and drops the exception it raises."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
            pass


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGTERM, EXIT_PREEMPTED, "stopped (SIGTERM); what it committed is kept: run the same command again"),
    (signal.SIGINT, EXIT_INTERRUPTED, "interrupted; what it committed is kept: run the same command again")])
def test_a_stop_swallowed_by_a_destructor_still_stops_the_command(signum, code, line, monkeypatch, capsys, tmp_path):
    ran_on = []

    def command(args) -> int:
        SignalsWhileCollected(signum)
        gc.collect()
        Progress(logging.getLogger("test"), 10).update(1)  # the next unit of work: it stops here
        ran_on.append("after the signal")  # what used to run to the end, exit 0
        return 0

    monkeypatch.setattr("clipforge.commands.models.run_list", command)
    assert main(["models", "list", "--dir", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert line in err and len(err.strip().splitlines()) == 1 and "Exception ignored" not in err, err
    assert not ran_on
    monkeypatch.undo()
    assert main(["models", "list", "--dir", str(tmp_path)]) == 0  # the next call in this process starts clean


@pytest.mark.parametrize(("argv", "server", "line"), [
    (["serve", "--index", "CACHE", "--no-browser"], "clipforge.web.search_app.serve_search",
     "clipforge serve: stopped (SIGTERM)\n"),
    (["caption", "DATASET", "--no-browser"], "clipforge.web.captioning.serve_captioning",
     "clipforge caption: stopped (SIGTERM); every caption saved is in index.csv\n"),
    (["runs", "ARTIFACTS", "latest", "--watch"], "clipforge.orchestrate.runs.watch_run",
     "clipforge runs: stopped (SIGTERM)\n"),
])
def test_a_server_stopped_by_sigterm_does_not_speak_of_going_on(argv, server, line, monkeypatch, capsys):
    def serve_until_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between these bytecodes
            pass

    monkeypatch.setattr(server, serve_until_sigterm)
    assert main(argv) == EXIT_PREEMPTED
    assert capsys.readouterr().err == line



@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGTERM, EXIT_PREEMPTED, "stopped (SIGTERM)"),
                                                      (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")])
@pytest.mark.parametrize("raised", [ImportError("cannot load module more than once per process"),
                                    RecursionError("maximum recursion depth exceeded"), OSError(5, "I/O error")])
def test_an_error_a_stop_raised_inside_an_import_is_that_stop(signum, code, line, raised, monkeypatch, capsys,
                                                               tmp_path):
    """A signal in the first half second lands while torch is imported: the import turns the stop into an
    error of its own, which must still be one line and the stop's exit code, not a traceback and exit 1."""
    def command(args) -> int:
        try:
            os.kill(os.getpid(), signum)
            for _ in range(1000):
                pass
        except BaseException as stop:  # Stopped, KeyboardInterrupt
            raise raised from stop
        return 0

    monkeypatch.setattr("clipforge.commands.models.run_list", command)
    assert main(["models", "list", "--dir", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert line in err and len(err.strip().splitlines()) == 1, err


def test_an_s3_failure_after_sigterm_is_said_and_exits_as_the_stop(monkeypatch, capsys, tmp_path):
    """A drained pod whose S3 goes away meanwhile: exit 75, which a Job retries, not 2, which it does not."""
    from botocore.exceptions import EndpointConnectionError

    def command(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        except BaseException as stop:  # noqa: BLE001 (the stop, turned into what a library would raise)
            raise EndpointConnectionError(endpoint_url="http://s3.example") from stop
        return 0

    monkeypatch.setattr("clipforge.commands.models.run_list", command)
    assert main(["models", "list", "--dir", str(tmp_path)]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "s3.example" in err and "stopped (SIGTERM)" in err


EXITING = """
import atexit, concurrent.futures, sys, threading, time
from pathlib import Path
from clipforge.cli import exit_without_teardown
folder = Path(sys.argv[1])
def late(name):
    time.sleep(0.5)
    (folder / name).write_text("done")
threading.Thread(target=late, args=("thread",)).start()
concurrent.futures.ThreadPoolExecutor(1).submit(late, "pool")
atexit.register(lambda: (folder / "atexit").write_text("ran"))
print("printed", end="")
print("said", end="", file=sys.stderr)
exit_without_teardown(3)
"""


def test_the_console_script_exits_as_python_would_without_its_teardown(tmp_path):
    """What exit does that matters still happens: threads finish their work, atexit handlers run, both streams
    are flushed (into pipes, where they are buffered), and the exit code is the command's."""
    proc = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "printed" and proc.stderr == "said"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit", "pool", "thread"]


@pytest.mark.parametrize("argv", [
    ["cache", "--source", "x.hdf5", "--index", "i.parquet", "--model", "ViT-B-32", "--pretrained", "openai",
     "--output"],
    ["index", "nsd", "--expdesign", "e.mat", "--subject", "subj01", "--output"],
    ["train-adapter", "--clip-cache", "a", "--target-cache", "b", "--out"],
    ["evaluate", "--clip-cache", "a", "--target-cache", "b", "--adapter", "c", "--out"],
    ["generate", "--embeddings", "a", "--pipeline", "p", "--out"],
    ["finetune", "--train-data", "t.csv", "--val-data", "v.csv", "--out"],
], ids=lambda argv: argv[0])
def test_an_output_that_is_a_file_is_said_before_any_work(argv, tmp_path, capsys):
    """Not once the work is done and its first write fails (evaluate scored everything first)."""
    output = tmp_path / "afile"
    output.write_text("mine")
    assert main([*argv, str(output)]) == 2
    flag = argv[-1]
    assert capsys.readouterr().err.strip().endswith(f"error: {flag} {output} is a file, not a folder")
    assert output.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("argv", [
    ["cache", "--source", "x.hdf5", "--index", "i.parquet", "--model", "ViT-B-32", "--pretrained", "openai",
     "--output"],
    ["evaluate", "--clip-cache", "a", "--target-cache", "b", "--adapter", "c", "--out"],
    ["finetune", "--train-data", "t.csv", "--val-data", "v.csv", "--out"],
], ids=lambda argv: argv[0])
def test_an_output_inside_a_file_is_said_before_any_work(argv, tmp_path, capsys):
    output = tmp_path / "afile"
    output.write_text("mine")
    assert main([*argv, str(output / "run")]) == 2
    said = capsys.readouterr().err.strip()
    assert said.endswith(f"error: {argv[-1]} {output / 'run'}: {output} is a file, not a folder"), said


def test_the_os_s_words_about_a_path_become_a_sentence(tmp_path):
    """`x: File exists` (a folder wanted where a file is) and `ds: Is a directory` said as what is wrong."""
    from clipforge.cli import path_problem

    (tmp_path / "x").write_text("mine")
    (tmp_path / "ds").mkdir()
    assert path_problem(FileExistsError(17, "File exists", str(tmp_path / "x"))) == \
        f"{tmp_path / 'x'} is a file, where a folder is needed"
    assert path_problem(NotADirectoryError(20, "Not a directory", str(tmp_path / "x" / "y" / "z.csv"))) == \
        f"{tmp_path / 'x'} is a file, where a folder is needed (for {tmp_path / 'x' / 'y' / 'z.csv'})"
    assert path_problem(IsADirectoryError(21, "Is a directory", str(tmp_path / "ds"))) == \
        f"{tmp_path / 'ds'} is a folder, where a file is needed"
    assert path_problem(PermissionError(13, "Permission denied", "/root/x")) == "/root/x: Permission denied"


def test_a_problem_of_the_whole_config_names_flags_when_only_flags_were_given(tmp_path, capsys):
    """Not `(config): give either index, or subject with index_root`, when --index and --subject were given."""
    argv = ["cache", "--source", "x.hdf5", "--index", "i.parquet", "--subject", "subj01", "--index-root", "idx",
            "--model", "ViT-B-32", "--pretrained", "openai", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == ("clipforge cache: error: give --index, or --subject with --index-root, "
                                               "not both")
    (tmp_path / "cache.yaml").write_text("index: i.parquet\nsubject: subj01\nindex_root: idx\n")
    assert main([argv[0], "--config", str(tmp_path / "cache.yaml"), *argv[1:3], *argv[9:]]) == 2
    assert capsys.readouterr().err.strip().endswith("(config): give index, or subject with index_root, not both")


def test_a_key_spelled_with_dashes_in_a_config_file_gets_a_suggestion(tmp_path, capsys):
    (tmp_path / "adapter.yaml").write_text("batch-size: 64\nepocks: 2\n")
    assert main(["train-adapter", "--config", str(tmp_path / "adapter.yaml"), "--clip-cache", "a", "--target-cache",
                 "b", "--out", "c"]) == 2
    config = tmp_path / "adapter.yaml"
    assert capsys.readouterr().err.strip().endswith(f"{config}: batch-size: unknown key; did you mean batch_size?; "
                                                    f"{config}: epocks: unknown key; did you mean epochs?")


def test_a_setting_not_given_is_named_by_its_flag(capsys):
    assert main(["train-adapter", "--clip-cache", "a"]) == 2
    said = capsys.readouterr().err.strip()
    assert said == "clipforge train-adapter: error: --target-cache: required; --out: required"


def test_the_first_progress_line_waits_a_period_rather_than_guess_an_eta_from_one_item(caplog, monkeypatch):
    """240 images checked in a second logged `1/240 ..., ETA 0:00:53` first: a rate over a pool's first item."""
    from clipforge import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    meter = Progress(logging.getLogger("clipforge.test"), 240, unit="images")
    with caplog.at_level("INFO", logger="clipforge.test"):
        clock[0] += 0.2
        meter.update(1)
        assert not caplog.records
        clock[0] += 2.0
        meter.update(200)
    assert [r.getMessage() for r in caplog.records] == ["201/240 images, 91.4 images/s, ETA 0:00:00"]


def test_the_no_credentials_hint_offers_the_public_bucket_flag_only_to_commands_that_have_it():
    """`search` has no --no-sign-request: advising it sent the user to an "unrecognized arguments" error."""
    import botocore.exceptions

    from clipforge.cli import s3_failure

    missing = botocore.exceptions.NoCredentialsError()
    for argv, hint in ((["search", "--index", "s3://b/c", "x"], False),
                       (["cache", "--source", "s3://b/n.hdf5", "--output", "o"], True)):
        parser = build_parser()
        said = s3_failure(missing, chosen_parser(parser.commands[argv[0]], parse(parser, argv)))
        assert said.startswith("no AWS credentials found") and ("--no-sign-request" in said) == hint, said


def test_a_list_flag_given_no_values_is_an_error_not_an_empty_list(capsys):
    """`--generated` followed by nothing (an unset variable) evaluated as if no images had been generated."""
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--clip-cache", "a", "--target-cache", "b", "--generated", "--out", "o"])
    assert exit_.value.code == 2
    assert "argument --generated: expected at least one argument" in capsys.readouterr().err


def test_demo_data_does_not_replace_a_folder_of_real_data(tmp_path, capsys):
    """`clipforge demo-data data` where data/ holds the real nsd_expdesign.mat wrote a synthetic one over it."""
    (tmp_path / "nsd_expdesign.mat").write_bytes(b"the real one")
    assert main(["demo-data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"clipforge demo-data: error: {tmp_path} holds nsd_expdesign.mat, " \
                                              "which demo-data did not write and would replace: give demo-data a " \
                                              "folder of its own"
    assert (tmp_path / "nsd_expdesign.mat").read_bytes() == b"the real one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsd_expdesign.mat"]


def test_a_listing_row_stays_one_line_whatever_a_file_is_named():
    """A file name holding a newline split its row of `search` (and of every listing) in two."""
    from clipforge.tables import escape_controls, text_table

    table = text_table([("id", "score"), ("n/two\nlines.png", 0.5), ("café\t.png", 0.25)])
    assert table.splitlines() == ["id                score", "n/two\\nlines.png  0.5", "café\\t.png        0.25"]
    assert escape_controls("über 日本 \x1b[31m") == "über 日本 \\x1b[31m"


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGTERM, EXIT_PREEMPTED, "clipforge: stopped (SIGTERM) before it began; nothing was written\n"),
    (signal.SIGINT, EXIT_INTERRUPTED, "clipforge: interrupted before it began; nothing was written\n")])
def test_a_signal_while_the_commands_import_is_one_line_and_the_stops_exit_code(signum, code, line):
    """Ctrl-C in the first second gave a 62-line traceback from inside pydantic, SIGTERM a silent death (143):
    the console script, signalled while it builds its parser, as a real process."""
    script = ("import os, signal, sys; import clipforge.cli as cli; real = cli.build_parser\n"
              f"cli.build_parser = lambda: (os.kill(os.getpid(), {int(signum)}), real())[1]\n"
              "sys.argv = ['clipforge', 'runs', 'nowhere']; cli.entry()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (code, line)


def test_a_training_worker_stopped_by_its_launcher_says_so_not_that_it_was_stopped(monkeypatch, capsys, tmp_path):
    """A peer killed (the OOM killer): torchrun stops the survivors, each of which said "stopped (SIGTERM);
    what it committed is kept", as if the user had stopped the command."""
    def command(args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    monkeypatch.setattr("clipforge.commands.models.run_list", command)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    assert main(["models", "list", "--dir", str(tmp_path)]) == EXIT_PREEMPTED
    assert capsys.readouterr().err == "clipforge models: worker rank 1 stopped by its launcher (SIGTERM)\n"


def test_a_signal_after_the_command_ended_is_not_said_to_come_before_it_began():
    """The early handler stayed in force while the process exited (threads finishing, atexit): a SIGTERM then
    printed "stopped before it began" and exit 75, which a driver retries, after the command had ended."""
    script = ("import atexit, os, signal, sys; import clipforge.cli as cli\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              "sys.argv = ['clipforge', 'runs', 'nowhere']; cli.entry()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "before it began" not in done.stderr and done.returncode != EXIT_PREEMPTED, done.stderr


def test_the_version_is_the_one_manifests_record(tmp_path, capsys):
    """A bug report or a CI log says which clipforge made an artifact: `--version` prints what manifests record."""
    from clipforge.storage.manifest import write_manifest

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    manifest = write_manifest(str(tmp_path), kind="cache", config={}, config_fingerprint="f", inputs={})
    assert exit_.value.code == 0 and capsys.readouterr().out == f"clipforge {manifest['clipforge_version']}\n"
