"""The shared helpers: nnU-Net executables and logged commands, schedules from the environment, dataset names,
nnUNet_extTrainer registration, atomic files and the selective scan's FLOP formula."""

import os
import stat
import sys

import pytest
import torch

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_path, atomic_write_text
from nnunetv2_hymunet.nnunet_ext_hook import with_ext_trainer_folder
from nnunetv2_hymunet.nnunet_tools import dataset_id, find_executable, parse_new_dataset, read_schedule, run_logged
from nnunetv2_hymunet.ssm.selective_scan import counting_scan_flops, selective_scan_flops, selective_scan_fn


def test_find_executable_prefers_this_environment(monkeypatch):
    assert find_executable("nnUNetv2_train") == os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(HyMUNetError, match="no_such_tool_xyz not found"):
        find_executable("no_such_tool_xyz")


def test_run_logged_appends_and_quotes_the_tail_on_failure(tmp_path):
    log = str(tmp_path / "logs" / "run.log")
    seen = []
    env = dict(os.environ, HYMUNET_TOOLS_TEST="1")
    run_logged([sys.executable, "-c", "print('first')"], log, env, append=True, on_line=seen.append)
    with pytest.raises(HyMUNetError, match="exit code 4") as info:
        run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(4)"], log, append=True)
    text = open(log).read()
    assert seen == ["first\n"] and "first" in text and "boom" in text and "HYMUNET_TOOLS_TEST=1" in text
    assert log in str(info.value) and "boom" in str(info.value)
    with pytest.raises(HyMUNetError, match="timed out"):
        run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, timeout=1)


def test_read_schedule_names_the_bad_variable():
    mapping = {"X_EPOCHS": "num_epochs", "X_ITERS": "num_iterations_per_epoch"}
    assert read_schedule(mapping, {"X_EPOCHS": " 3 ", "X_ITERS": ""}) == {"num_epochs": 3}
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(HyMUNetError, match=f"X_ITERS={bad!r}: expected a positive integer"):
            read_schedule(mapping, {"X_ITERS": bad})


def test_dataset_names_and_ids():
    assert dataset_id("Dataset042_Foo") == 42 and dataset_id("/x/Dataset501_ISIC2018") == 501
    assert parse_new_dataset("501") == (501, None)
    assert parse_new_dataset("Dataset007_My-Set") == (7, "My-Set")
    for bad in ("0", "1000", "abc", "Dataset5_X", ""):
        with pytest.raises(HyMUNetError, match="^-d "):
            parse_new_dataset(bad)
    with pytest.raises(HyMUNetError):
        dataset_id("Task501_Foo")


def test_ext_trainer_folder_is_appended_once(tmp_path):
    folder = str(tmp_path)
    assert with_ext_trainer_folder(folder, None) == folder
    assert with_ext_trainer_folder(folder, f"/mine{os.pathsep}{folder}/") == f"/mine{os.pathsep}{folder}/"
    assert with_ext_trainer_folder(folder, "/mine") == f"/mine{os.pathsep}{folder}"


def test_atomic_path_leaves_old_file_or_new_one(tmp_path):
    target = str(tmp_path / "a.txt")
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            open(temp, "w").write("half")
            raise RuntimeError
    assert open(target).read() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with atomic_path(target, executable=True) as temp:
        open(temp, "w").write("new")
    assert open(target).read() == "new" and os.stat(target).st_mode & stat.S_IXUSR


def test_scan_flops_are_counted_through_the_registered_formula():
    from torch.utils.flop_counter import FlopCounterMode

    b, d, L, n = 2, 8, 16, 4
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=g), torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    expected = selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
    everything = selective_scan_flops(b, d, L, n, D=True, z=True, delta_bias=True, delta_softplus=True)
    assert everything == b * d * L * (7 * n + 10)
    assert selective_scan_flops(b, d, L, n) == b * d * L * (7 * n + 1)
    with torch.no_grad(), counting_scan_flops(), FlopCounterMode(display=False) as counter:
        out = selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(out, expected)  # counting does not change the result
    assert counter.get_total_flops() == b * d * L * (7 * n + 10)
    with torch.no_grad(), counting_scan_flops(), FlopCounterMode(display=False) as counter:  # meta: shapes only
        out, last = selective_scan_fn(*(t.to("meta") for t in (u, delta, A, B, C)), return_last_state=True)
    assert out.shape == (b, d, L) and last.shape == (b, d, n) and counter.get_total_flops() == b * d * L * (7 * n + 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # outside the switch: the scan is not seen
        selective_scan_fn(u, delta, A, B, C)
    assert counter.get_total_flops() == 0
