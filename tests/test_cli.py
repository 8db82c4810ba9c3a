"""``hf-paged`` command line: bad arguments give argparse's one-line error before any work, help and
errors answer without loading torch/transformers, and ``bench --plot`` draws every measured system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_paged.entrypoints import bench, cli
from hf_paged.entrypoints.bench import SYSTEMS, BenchResult, Workload, concurrency_levels, plot_throughput


def no_cuda_device() -> str:
    """A --device that this machine cannot serve: cuda on a CPU-only torch, else one past the last GPU."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a command gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started work despite a bad argument")

    monkeypatch.setattr(bench, "build_model", refuse)
    monkeypatch.setattr("hf_paged.entrypoints.demo.load_model", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--dtype", "fp17"], "argument --dtype: unknown dtype 'fp17'"),
        (["bench", "--dtype", "int8"], "argument --dtype: unknown dtype 'int8'"),
        (["demo", "--device", "gpu"], "argument --device: unknown device 'gpu'"),
        (["demo", "--device", no_cuda_device()], f"--device {no_cuda_device()}: "),
        (["bench", "--device", no_cuda_device()], f"--device {no_cuda_device()}: "),
        (["demo", "--batch-size", "0"], "argument --batch-size: must be an int >= 1, got '0'"),
        (["demo", "--new-tokens", "x"], "argument --new-tokens: must be an int >= 1, got 'x'"),
        (["demo", "--block-size", "24"], "argument --block-size: must be a multiple of 16"),
        (["bench", "--num-prompts", "0"], "argument --num-prompts: must be an int >= 1, got '0'"),
        (["bench", "--max-num-seqs", "-4"], "argument --max-num-seqs: must be an int >= 1"),
        (["bench", "--min-len", "50", "--max-len", "10"], "--min-len 50 is larger than --max-len 10"),
        (["bench", "--max-len", "8190"], "more than the model's 8192 positions"),
        (["bench", "--systems", "continuous,vllm"], "--systems: unknown 'vllm'; choose from continuous"),
        (["bench", "--systems", ","], "--systems: unknown empty list"),
        (["bench", "--model", "no-such-org/no-such-model"], "only local folders and one of the random-weight shapes"),
        (["demo", "--model", "no-such-org/no-such-model"], "only local folders and the embedded default"),
        (["bench", "--plot", "/no/such/folder/out.png"], "--plot /no/such/folder/out.png: the folder"),
        (["serv"], "argument COMMAND: invalid choice: 'serv'"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys, nothing_runs):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"hf-paged {argv[0]}: error:" if argv[0] != "serv" else "hf-paged: error:")
    assert message in errors[0], err
    assert "Traceback" not in err


def test_model_folder_without_config_is_refused(tmp_path, capsys, nothing_runs):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", str(tmp_path)])
    assert "has no config.json" in capsys.readouterr().err


def test_dtype_aliases_and_defaults():
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--dtype", "fp16"]).dtype == "float16"
    assert parser.parse_args(["bench", "--dtype", "BF16"]).dtype == "bfloat16"
    args = parser.parse_args(["bench"])
    assert (args.model, args.num_prompts, args.systems) == ("tiny", 32, ",".join(SYSTEMS))


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys, nothing_runs, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--plot", str(tmp_path / "out.png")])
    assert exit_info.value.code == 2
    assert 'pip install "hf_paged[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


PROBE = """
import sys
from hf_paged.entrypoints.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code, file=sys.stderr)
print("heavy:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["demo", "--help"], ["bench", "--num-prompts", "0"]])
def test_help_and_argument_errors_do_not_load_torch_or_transformers(argv):
    out = run_cli(*argv)
    assert "heavy: []" in out.stdout, out.stdout + out.stderr
    assert "usage: hf-paged" in out.stdout + out.stderr


def test_hub_id_is_refused_at_once(tmp_path):
    out = run_cli("bench", "--model", "meta-llama/Llama-3.2-1B", env={"HF_HUB_CACHE": str(tmp_path)})
    assert "exit 2" in out.stderr and "work offline" in out.stderr and "hf download meta-llama/Llama-3.2-1B" in out.stderr
    assert "heavy: []" in out.stdout  # answered before torch or transformers were even imported


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot(tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    code = "from hf_paged.entrypoints.cli import _local_model; print(_local_model('org/tiny', 'x'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path)})  # fmt: skip
    assert out.stdout.strip() == repr((str(snapshot), None))
    # The cached config's positions bound the workload like a local folder's.
    args = cli.build_parser().parse_args(["bench", "--model", str(snapshot), "--max-len", "60", "--new-tokens", "8"])
    assert "more than the model's 64 positions" in cli._check_bench_workload(args)


def test_concurrency_sweep_is_clipped_to_the_workload():
    assert concurrency_levels(8, 512) == [1, 2, 4, 8]
    assert concurrency_levels(2000, 512) == [32, 64, 128, 256, 512]
    assert concurrency_levels(100, 512) == [8, 16, 32, 64, 100]
    assert concurrency_levels(300, 64) == [4, 8, 16, 32, 64]
    assert concurrency_levels(1, 512) == [1]


def test_plot_shows_every_system_from_zero(tmp_path):
    workload = Workload(100, 4, 12, 4)
    sweep = [BenchResult("continuous", 10 * level, 0, 1.0, extra={"max_num_seqs": level}) for level in concurrency_levels(100, 512)]
    results = [BenchResult(name, 500, 0, 1.0 + i, extra={"max_num_seqs": 512}) for i, name in enumerate(SYSTEMS)]
    fig = plot_throughput(sweep, results, workload, 16, str(tmp_path / "out.png"))
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    for name in SYSTEMS:
        assert any(label.startswith(name) for label in labels), (name, labels)
    assert ax.get_ylim()[0] == 0
    assert [int(t) for t in ax.get_xticks()] == [8, 16, 32, 64, 100]  # nothing beyond 100 prompts
    assert (tmp_path / "out.png").stat().st_size > 0


def test_bench_with_plot_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    argv = ["bench", "--systems", "continuous", "--num-prompts", "2", "--min-len", "4", "--max-len", "6",
            "--new-tokens", "2", "--device", "cpu", "--plot", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("max_num_seqs")] == [
        "max_num_seqs    1", "max_num_seqs    2"
    ]
    assert out.stat().st_size > 0 and Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
