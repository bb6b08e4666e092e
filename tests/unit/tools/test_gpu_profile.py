"""The GPU check's trainer profile (benchmarks/gpu_check.sh, part 4), run on the CPU: its twin."""

from __future__ import annotations

import json

import pytest

from stream_learner.tools.gpu_profile import main
from tests.support.tiny_model import tiny_model_dir


def test_the_profile_runs_on_the_cpu_and_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--steps", "6", "--warmup", "2", "--profiled", "3", "--model", tiny_model_dir(), "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["device_name"] is None
    assert out["steps"] == 6 and out["examples_per_step"] > 0
    assert out["steps_per_second"] == pytest.approx(out["steps"] / out["seconds"])
    assert out["examples_per_second"] == pytest.approx(6 * out["examples_per_step"] / out["seconds"], rel=0.3)
    assert out["peak_memory_mib"] > 0 and out["peak_memory_of"] == "process peak RSS"
    # the device's figures are a GPU's only; the host's gap between forward and backward is measured
    assert out["device_busy_share"] is None and out["syncs_per_step"] is None
    assert out["host_ms_between_forward_and_backward"] >= 0
