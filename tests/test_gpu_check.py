"""benchmarks/gpu_check.sh, the one command for a GPU machine, run as far as a CPU allows: the one-line answer
without a GPU, and every step at tiny sizes on the CPU (GPU_CHECK_TINY=1), so that a typo, a changed
signature or a wrong pattern shows here rather than on a rented GPU."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEP_SETTINGS = [f"{p}, channels_last {layout}" for p in ("bf16", "fp16", "fp32") for layout in ("off", "on")]


def run_check(**env):
    environment = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, env=environment)


def table_rows(output):
    """{check: [(setting, result), ...]} of the markdown table in the output."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("check", "---"):
            rows.setdefault(cells[0], []).append((cells[1], cells[2]))
    return rows


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = run_check()
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith("gpu_check: no CUDA GPU visible to ") and "nothing to check" in done.stdout


def test_every_step_runs_on_the_cpu_at_tiny_sizes():
    done = run_check(GPU_CHECK_TINY="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout
    rows = table_rows(done.stdout)
    (_, result), = rows.pop("pytest -m cuda")
    assert re.fullmatch(r"ok: \d+ skipped", result), result
    check, = [check for check in rows if re.fullmatch(r"training step, [\d,]+ parameters, patch 16x16x16, batch 2",
                                                       check)]
    steps = rows.pop(check)
    assert [setting.replace(" (train.py's choice)", "") for setting, _ in steps] == STEP_SETTINGS
    assert sum("(train.py's choice)" in setting for setting, _ in steps) == 1
    for _, result in steps:
        assert re.fullmatch(r"\d+\.\d\d steps/s, \d+\.\d patches/s, peak n/a \(CPU\)", result), result
    (setting, result), = rows.pop("data loader, patches of the prepared generated cases")
    assert setting == "num_workers 2"
    assert re.fullmatch(r"\d+\.\d patches/s; (not loader-bound: \d+\.\dx|LOADER-BOUND: training waits, the loader "
                        r"gives \d+%) .*", result), result
    (setting, result), = rows.pop("augment nnunet on the CPU, batched after the loader")  # augment_on=device
    assert setting == "batch 2, patch 16x16x16"
    assert re.fullmatch(r"\d+\.\d{3} s per batch, \d+% of a training step", result), result
    (setting, result), = rows.pop("torchrun train.py, 2 epochs")
    assert setting == "2 process(es), gloo, steps_per_epoch 1"
    assert re.fullmatch(r"ok: epoch 2 took \d+\.\d s with validation", result), result
    predicted = rows.pop("predict one whole case (40x40x32: read, infer, write), sw_batch_size 8")
    assert [setting for setting, _ in predicted] == ["no TTA", "mirror TTA (8 passes)"]
    assert all(re.fullmatch(r"\d+\.\d s", result) for _, result in predicted), predicted
    assert not rows


def test_failures_become_rows_that_say_so(gpu_check, tmp_path, capsys):
    results, log = tmp_path / "results.jsonl", tmp_path / "step.log"
    log.write_text("collecting ...\n=== 1 failed, 6 passed, 2 deselected in 30.1s ===\n")
    gpu_check.main(["pytest", str(results), "--rc", "1", "--log", str(log)])
    log.write_text("Traceback (most recent call last):\nRuntimeError: NCCL error: unhandled system error\n\n")
    gpu_check.main(["failed", str(results), "--check", "steps", "--log", str(log)])
    gpu_check.main(["table", str(results)])
    assert table_rows(capsys.readouterr().out) == {
        "pytest -m cuda": [("", "FAILED: 1 failed, 6 passed, 2 deselected")],
        "steps": [("", "FAILED: RuntimeError: NCCL error: unhandled system error")]}
