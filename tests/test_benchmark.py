"""cfgrl-benchmark: a tiny real run prints a filled table; settings that would time nothing are refused."""
import re

import pytest
import torch

from training import benchmark


def test_tiny_run_reports_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert benchmark.main(["--engines", "torch,auto", "--flow-steps", "2", "--iterations", "3", "--batches", "4",
                           "--min-seconds", "0.1", "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| torch |"))
    load_s, latency, throughput, rss = [cell.strip() for cell in row.strip("|").split("|")[1:]]
    p50, p99 = (float(x) for x in re.findall(r"[\d.]+", latency))
    assert 0 < p50 <= p99
    assert float(throughput.replace(",", "")) > 0 and float(rss) > 0 and float(load_s) >= 0  # 1,234 actions/s
    assert "b4 K=16 actions/s" in out.read_text()
    assert re.search(r"^\| auto: \w+ \|", out.read_text(), re.M)  # the engine auto chose, in a row of its own


@pytest.mark.parametrize("flag, value", [("--batches", "0"), ("--batches", "64,-1"), ("--flow-steps", "x"),
                                         ("--iterations", "0"), ("--threads", "1,2"), ("--min-seconds", "nan"),
                                         ("--min-seconds", "0")])
def test_settings_that_time_nothing_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_unknown_engine_missing_checkpoint_or_gpu_are_refused(tmp_path, capsys):
    assert benchmark.main(["--engines", "torch,tensorflow"]) == 2
    assert "unknown engines ['tensorflow']" in capsys.readouterr().err
    assert benchmark.main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert benchmark.main(["--device", "cuda"]) == 2
        assert "this machine has no CUDA device" in capsys.readouterr().err
