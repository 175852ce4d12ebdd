"""Locks of the BIDS App's output folder: participant runs side by side (SLURM array tasks),
the group level alone, and a per-run work folder. ``flock`` conflicts between open file
descriptions, so two lock objects in one process behave as two processes would."""

from __future__ import annotations

import os
import threading
import time

import pytest

from brain_ldm_nodes.bids_app.errors import LockHeldError
from brain_ldm_nodes.bids_app.locks import OutputLock, ParticipantLocks
from brain_ldm_nodes.bids_app.naming import DEFAULT_WORK_DIR_NAME, LOCK_NAME, LOCKS_DIR_NAME
from brain_ldm_nodes.bids_app.output_dir import default_work_dir, remove_stale_temporaries


def test_runs_on_disjoint_participants_hold_the_folder_together(tmp_path):
    with ParticipantLocks(tmp_path, ["01"]), ParticipantLocks(tmp_path, ["02", "03"]):
        holder = (tmp_path / LOCKS_DIR_NAME / "sub-02.lock").read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        assert (tmp_path / LOCK_NAME).read_text() == ""  # shared holders leave it empty
    for label in ("01", "02", "03"):
        assert (tmp_path / LOCKS_DIR_NAME / f"sub-{label}.lock").read_text() == ""


def test_a_participant_held_by_another_run_is_refused_naming_it(tmp_path):
    with ParticipantLocks(tmp_path, ["01", "02"]):
        with pytest.raises(LockHeldError) as refused:
            with ParticipantLocks(tmp_path, ["02", "03"]):
                pass
    message = str(refused.value)
    assert message.startswith(f"output_dir {tmp_path} is in use by another brain-ldm-bids run "
                              f"(pid {os.getpid()} on ")
    assert message.endswith(" for sub-02; wait for it to finish or choose another output folder")
    # the refused run released what it had taken (sub-03) and its shared lock
    with OutputLock(tmp_path):
        pass


def test_the_group_level_waits_for_no_one_and_names_participant_runs(tmp_path):
    with ParticipantLocks(tmp_path, ["01"]):
        with pytest.raises(LockHeldError) as refused:
            with OutputLock(tmp_path):
                pass
    assert f"(pid {os.getpid()} on " in str(refused.value)
    assert ", sub-01)" in str(refused.value)
    with OutputLock(tmp_path):  # and while the group level runs, no participant run starts
        with pytest.raises(LockHeldError, match="in use by another brain-ldm-bids run"):
            with ParticipantLocks(tmp_path, ["01"]):
                pass


def test_dataset_files_lock_serialises_writers_and_waits(tmp_path):
    order = []
    with ParticipantLocks(tmp_path, ["01"]) as first, ParticipantLocks(tmp_path, ["02"]) as second:
        with first.dataset_files():
            def other():
                with second.dataset_files():
                    order.append("second")
            thread = threading.Thread(target=other)
            thread.start()
            time.sleep(0.3)
            order.append("first")
        thread.join(timeout=10)
        assert order == ["first", "second"]
        with first.dataset_files():
            with pytest.raises(LockHeldError, match=r"\(waited 0 s\) for dataset_description.json"):
                with second.dataset_files(timeout_s=0.1):
                    pass


def test_stale_temporaries_of_other_participants_are_left_alone(tmp_path):
    mine = tmp_path / "sub-01" / "anat" / ".sub-01_desc-synthetic_T1w.nii.gz.tmp-1"
    theirs = tmp_path / "sub-02" / "anat" / ".sub-02_desc-synthetic_T1w.nii.gz.tmp-2"
    for path in (mine, theirs):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path, ["01"]) == [mine]
    assert theirs.exists()
    assert remove_stale_temporaries(tmp_path) == [theirs]


def test_work_folders_are_per_set_of_participants(tmp_path):
    root = tmp_path / DEFAULT_WORK_DIR_NAME
    assert default_work_dir(tmp_path, ["01"]) == root / "sub-01"
    both = default_work_dir(tmp_path, ["02", "01"])
    assert both == default_work_dir(tmp_path, ["01", "02", "01"])  # order and repeats ignored
    assert both.parent == root and both.name.startswith("participants-")
    assert both != default_work_dir(tmp_path, ["01", "03"])
