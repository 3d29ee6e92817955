"""Stage leases: one run at a time per output, on disk and on S3 (moto's server), with real threads."""

import json
import logging
import threading
import time

import pytest

from clipforge.orchestrate.lease import HELD, LEASE_NAME, StageLease, holder_gone, lease_holder
from clipforge.storage import conditional
from clipforge.storage import uri as storage

FAST = {"poll": 0.02, "renew_every": 0.05, "stale_after": 5.0}


@pytest.fixture(params=["disk", "s3"])
def output(request, tmp_path):
    if request.param == "disk":
        return str(tmp_path / "adapter" / "key")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/adapter/key"


def abandon(lease: StageLease) -> None:
    """What a runner killed with SIGKILL leaves: the lease held, never renewed, never released (and, as its
    process is gone, held by nobody alive)."""
    lease._stop.set()
    lease._renewer.join()
    HELD.discard(lease.holder)


def test_compare_and_swap(output):
    uri = storage.join(output, "x.json")
    first = conditional.write_if(uri, b"1", None)
    assert first is not None
    assert conditional.write_if(uri, b"2", None) is None  # it exists: a create loses
    second = conditional.write_if(uri, b"3", first)
    assert second is not None and conditional.read_versioned(uri) == (b"3", second)
    assert conditional.write_if(uri, b"4", first) is None  # a writer holding an old version loses
    assert storage.read_bytes(uri) == b"3"


def test_a_second_run_waits_until_the_first_is_done(output, caplog):
    spans = {}

    def run(run_id: str, hold: float) -> None:
        with StageLease(output, run_id, "adapter", **FAST):
            spans[run_id] = [time.monotonic()]
            time.sleep(hold)
            spans[run_id].append(time.monotonic())

    first = threading.Thread(target=run, args=("ci-1", 1.0))
    first.start()
    while "ci-1" not in spans:
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="clipforge.run"):
        run("ci-2", 0.0)  # the holder is alive and not stale: it waits for the release
    first.join()
    assert spans["ci-2"][0] >= spans["ci-1"][1]
    assert "run ci-1 (on " in caplog.text and "is writing" in caplog.text
    assert not storage.exists(storage.join(output, LEASE_NAME))  # released


def test_a_held_lease_is_renewed_so_it_never_looks_stale(output):
    """What keeps a long stage's lease from a waiter's stale_after: a new version every renew_every."""
    uri = storage.join(output, LEASE_NAME)
    with StageLease(output, "long-run", "adapter", **FAST) as lease:
        first = lease.token
        deadline = time.monotonic() + 30
        while conditional.read_versioned(uri)[1] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.02)
        assert storage.read_json(uri)["run_id"] == "long-run"


def test_a_released_lease_is_gone_before_its_holder_is_forgotten(output, monkeypatch):
    """A waiter of the same process takes a lease whose holder this process no longer holds: until the file is
    deleted, the holder must still count as alive, or the release would delete the waiter's new lease."""
    seen = []
    delete = storage.delete

    def look_then_delete(uri: str) -> None:
        seen.append(holder_gone(lease_holder(storage.read_bytes(uri))))
        delete(uri)

    monkeypatch.setattr(storage, "delete", look_then_delete)
    with StageLease(output, "run-1", "adapter", **FAST):
        pass
    assert seen == [False]


def test_a_lease_of_a_gone_process_is_taken_back_at_once(output):
    held = StageLease(output, "run-7", "adapter", **FAST).__enter__()
    abandon(held)
    started = time.monotonic()
    with StageLease(output, "run-7", "adapter", **FAST):  # a restarted driver, a rerun after kill -9
        assert time.monotonic() - started < FAST["stale_after"] / 2  # not waited out as a stale one


def test_a_lease_nobody_renews_is_taken_over_after_it_goes_stale(output, caplog):
    held = StageLease(output, "dead-run", "adapter", **FAST).__enter__()
    abandon(held)
    lease_uri = storage.join(output, LEASE_NAME)  # held on another machine: only going stale frees it
    storage.write_json(lease_uri, {**storage.read_json(lease_uri), "host": "another-node"})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="clipforge.run"):
        with StageLease(output, "next-run", "adapter", **{**FAST, "stale_after": 0.4}) as lease:
            assert time.monotonic() - started >= 0.4
            holder = storage.read_json(storage.join(output, LEASE_NAME))
            assert holder["run_id"] == "next-run" and lease.token is not None
    assert "run dead-run (on another-node) held" in caplog.text and "taking it over" in caplog.text


def test_two_live_runners_with_one_run_id_do_not_write_together(output):
    """A CI job run twice for one commit: same run id, two live runners. The second waits."""
    first = StageLease(output, "sha-1", "adapter", **FAST).__enter__()
    started = time.monotonic()
    release = threading.Timer(0.5, first.__exit__)
    release.start()
    with StageLease(output, "sha-1", "adapter", **{**FAST, "stale_after": 5.0}):
        assert time.monotonic() - started >= 0.45
    release.join()


def test_a_holder_whose_lease_was_taken_is_told_to_stop(output, caplog):
    lost = threading.Event()
    lease = StageLease(output, "slow-run", "adapter", **FAST, on_lost=lost.set)
    with caplog.at_level(logging.ERROR, logger="clipforge.run"), lease:
        uri = storage.join(output, LEASE_NAME)  # another run took it over while this one could not renew
        taken = json.dumps({"run_id": "other", "host": "another-node", "pid": 1}).encode()
        while conditional.write_if(uri, taken, conditional.read_versioned(uri)[1]) is None:  # as a run takes it:
            pass  # by compare-and-swap, never between a renewal's read and its write
        assert lost.wait(2.0)
    assert "lost the lease" in caplog.text and "stopping the stage" in caplog.text
    assert storage.read_json(storage.join(output, LEASE_NAME))["run_id"] == "other"  # not released: not ours


def test_an_unreadable_lease_is_waited_out_like_any_other(output):
    storage.write_bytes(storage.join(output, LEASE_NAME), b"\x00 not json")
    started = time.monotonic()
    with StageLease(output, "run-1", "adapter", **{**FAST, "stale_after": 0.3}):
        assert time.monotonic() - started >= 0.3


def test_a_store_that_fails_on_release_is_said_not_raised(tmp_path, monkeypatch, caplog):
    """The stage's work is done and committed: an outage at the very end must not turn it into a crash."""
    output = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING), StageLease(output, "run-a", "cache"):
        monkeypatch.setattr(conditional, "read_versioned", lambda uri: (_ for _ in ()).throw(ConnectionError("down")))
    assert "[cache] could not release" in caplog.text and "ConnectionError" in caplog.text


def test_taking_a_lease_removes_the_temporary_files_killed_writes_left(tmp_path, caplog):
    """A process killed between a file's write and its rename leaves `.NAME.XXXXXXXX.tmp` (hidden, as large as
    the file): once the output's lease is taken nobody else writes there, so they go. Nothing else does."""
    import os
    import tempfile

    output = tmp_path / "cache" / "key"
    (output / "images").mkdir(parents=True)
    left = []
    for folder, name in ((output, "shard-00001-abc.parquet"), (output / "images", "7.png")):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=storage.TEMPORARY_SUFFIX, dir=folder)  # as written
        os.write(fd, b"x" * 1000)
        os.close(fd)
        left.append(tmp)
    (output / ".git").mkdir()
    kept = [output / "shard-00000-abc.parquet", output / ".DS_Store", output / "images" / ".notes.tmp",
            output / "images" / ".report.20240131.tmp", output / ".git" / f".x.abcdefgh{storage.TEMPORARY_SUFFIX}"]
    for path in kept:
        path.write_bytes(b"mine")
    with caplog.at_level(logging.INFO), StageLease(str(output), "run-1", "cache", **FAST):
        assert not any(os.path.exists(tmp) for tmp in left) and all(path.exists() for path in kept)
    assert "removed 2 temporary files that interrupted writes left in" in caplog.text

    # Taken over from a holder elsewhere that stopped renewing (a restarted driver's stage Job may still be
    # writing): its temporary files stay.
    fd, live = tempfile.mkstemp(prefix=".shard-00002-abc.parquet.", suffix=storage.TEMPORARY_SUFFIX, dir=output)
    os.close(fd)
    elsewhere = {"run_id": "run-0", "stage": "cache", "host": "another-node", "pid": 1, "holder": "x"}
    assert conditional.write_if(str(output / LEASE_NAME), json.dumps(elsewhere).encode(), None) is not None
    with StageLease(str(output), "run-1", "cache", **{**FAST, "stale_after": 0.2}):
        assert os.path.exists(live)


def test_a_renewal_whose_reply_was_lost_keeps_the_lease(output, monkeypatch, caplog):
    """The renewal's PUT reached S3 and the connection reset before its reply: botocore sent it again, with the
    old If-Match, and S3 answered 412. The holder stopped its own stage (exit 75) as if another run had taken
    over, and left the lease behind for 2 minutes."""
    real, lost_replies = conditional.write_if, []

    def reply_lost(uri, data, expected):
        token = real(uri, data, expected)
        if token is not None and expected is not None and len(lost_replies) < 2:
            lost_replies.append(token)
            return None  # what the retried PUT answers: precondition failed, by the write it already made
        return token

    monkeypatch.setattr(conditional, "write_if", reply_lost)
    lost = threading.Event()
    with caplog.at_level(logging.ERROR, logger="clipforge.run"):
        with StageLease(output, "long-run", "adapter", **FAST, on_lost=lost.set) as lease:
            deadline = time.monotonic() + 30
            while len(lost_replies) < 2 or lease.token in lost_replies[:1]:
                assert time.monotonic() < deadline and not lost.is_set()
                time.sleep(0.02)
            assert not lost.wait(0.3)
    assert "lost the lease" not in caplog.text
    assert not storage.exists(storage.join(output, LEASE_NAME))  # released: it was still its holder's


def test_a_renewal_whose_reply_and_next_look_were_both_lost_keeps_the_lease(output, monkeypatch, caplog):
    """The look after the lost reply failed on the same flaky network: the next renewal, with the old version,
    meets its own lease (another nonce, the same holder) and must not take it for another run's."""
    real_write, real_read, lost = conditional.write_if, conditional.read_versioned, []

    def reply_lost(uri, data, expected):
        token = real_write(uri, data, expected)
        if token is not None and expected is not None and not lost:
            lost.append(token)
            return None
        return token

    def look_fails_once(uri):
        if len(lost) == 1:
            lost.append("look failed")
            raise ConnectionError("the network again")
        return real_read(uri)

    monkeypatch.setattr(conditional, "write_if", reply_lost)
    monkeypatch.setattr(conditional, "read_versioned", look_fails_once)
    stopped = threading.Event()
    with caplog.at_level(logging.WARNING, logger="clipforge.run"):
        with StageLease(output, "long-run", "adapter", **FAST, on_lost=stopped.set) as lease:
            deadline = time.monotonic() + 30
            while len(lost) < 2 or lease.token == lost[0]:
                assert time.monotonic() < deadline and not stopped.is_set()
                time.sleep(0.02)
            assert not stopped.wait(0.3)
    assert "could not renew" in caplog.text and "lost the lease" not in caplog.text
