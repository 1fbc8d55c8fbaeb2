"""The command line: through subprocess as a user runs it (exit codes, output, files written), and
in-process through cli.main for the many argument cases (fast)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import twicediff

# The subprocess imports the same twicediff as this test (source tree or installed).
_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(twicediff.__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
_GPU = twicediff.build_info()["gpu_available"]


def twicediff_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "twicediff", *args], capture_output=True, text=True,
                          env=_ENV, timeout=timeout)


def twicediff_main(capsys, *args):
    """cli.main in this process (fast), as (exit status, stdout, stderr)."""
    from twicediff.app import cli

    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, result
    assert "usage: twicediff" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_help_lists_the_subcommands():
    result = twicediff_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("demo", "bench", "info"):
        assert command in result.stdout


def test_console_script_is_cli_main():
    import importlib
    import shutil

    from twicediff.app import cli

    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pyproject.toml")
    with open(pyproject) as f:
        declared = re.search(r'^twicediff = "([\w.]+):(\w+)"$', f.read(), flags=re.M)
    assert declared, "pyproject.toml declares no twicediff console script"
    assert getattr(importlib.import_module(declared.group(1)), declared.group(2)) is cli.main
    script = shutil.which("twicediff", path=os.path.dirname(sys.executable))
    if script:  # installed (as by scripts/setup.sh): the script itself runs
        result = subprocess.run([script, "--version"], capture_output=True, text=True, env=_ENV, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == f"twicediff {twicediff.__version__}"


def test_demo_help_explains_lambda(capsys):
    result = twicediff_main(capsys, "demo", "--help")
    assert result.returncode == 0, result.stderr
    assert "λ = 0.03" in result.stdout and "--regularization" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    ((), ("required",)),
    (("frobnicate",), ("invalid choice",)),
    (("demo", "--n-train", "0"), ("--n-train", "positive integer", "0")),
    (("demo", "--n-train", "many"), ("--n-train", "'many'")),
    (("demo", "--regularization", "-1"), ("--regularization", "-1")),
    (("demo", "--regularization", "nan"), ("--regularization", "nan")),
    (("demo", "--kfac-damping", "0"), ("--kfac-damping", "0")),
    (("demo", "--flip-fraction", "1.5"), ("--flip-fraction", "(0, 1)", "1.5")),
    (("demo", "--weight-decay", "-0.1"), ("--weight-decay", "-0.1")),
    (("demo", "--n-train", "1700", "--n-val", "300"), ("n_train + n_val", "1797", "1700 + 300")),
    (("demo", "--device", "tpu"), ("--device", "invalid choice", "'tpu'")),
    (("demo", "--dtype", "int8"), ("--dtype", "'int8'")),
    (("demo", "--seed", "-3"), ("--seed", "-3")),
    (("demo", "--bogus",), ("unrecognized arguments: --bogus",)),
    (("bench", "--directions", "1,x"), ("--directions", "'x'")),
    (("bench", "--repeats", "0"), ("--repeats", "0")),
    (("bench", "--untimed-first", "-1"), ("--untimed-first", "-1")),
    (("info", "--threads", "0"), ("--threads", "0")),
    (("info", "--seed", "1"), ("unrecognized arguments: --seed",)),
])
def test_bad_arguments_exit_2_with_usage(capsys, args, fragments):
    assert_usage_error(twicediff_main(capsys, *args), *fragments)


def test_bad_argument_through_the_console_exits_2():
    assert_usage_error(twicediff_cli("demo", "--regularization", "zero"), "--regularization", "'zero'")


@pytest.mark.skipif(_GPU, reason="a GPU is present, so --device cuda is valid")
def test_cuda_without_gpu_is_a_usage_error(capsys):
    assert_usage_error(twicediff_main(capsys, "demo", "--device", "cuda"), "--device", "cuda", "--device cpu")


def test_output_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("")
    assert_usage_error(twicediff_main(capsys, "demo", "--output", str(target)), "--output", "is a file")
    assert_usage_error(twicediff_main(capsys, "bench", "--output", str(target / "below")), "--output",
                       "cannot write under")


def test_info_text_and_json(capsys):
    result = twicediff_cli("info")
    assert result.returncode == 0, result.stderr
    for fragment in ("twicediff " + twicediff.__version__, "cuda_kernels", "torch threads", "memory budget"):
        assert fragment in result.stdout
    threads = torch.get_num_threads()
    try:
        result = twicediff_main(capsys, "info", "--json", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["build"] == json.loads(json.dumps(twicediff.build_info()))
    assert facts["cpu"]["torch_threads"] == 1
    assert facts["cpu"]["memory_budget_bytes"] > 0
    assert (len(facts["cuda_devices"]) >= 1) == _GPU


def _demo_metrics(stdout):
    """{ranking label prefix: (auc, precision)} parsed from the printed table."""
    rows = re.findall(r"^(harm to validation loss|self-influence g_i)\S*.*?\s([01]\.\d{3})\s+([01]\.\d{3})$",
                      stdout, flags=re.M)
    return {name: (float(auc), float(precision)) for name, auc, precision in rows}


def test_demo_default_run_finds_the_flipped_labels(tmp_path):
    """The README's first command, at its defaults (the one full demo run of the suite)."""
    result = twicediff_cli("demo", "--output", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    printed = _demo_metrics(result.stdout)
    saved = json.loads((tmp_path / "demo_seed0.json").read_text())
    assert saved["num_flipped"] == 120 and saved["num_params"] == 2410
    auc_val = saved["metrics"]["validation harm"]["auc"]
    auc_self = saved["metrics"]["self-influence"]["auc"]
    assert printed["harm to validation loss"][0] == pytest.approx(auc_val, abs=5e-4)
    assert printed["self-influence g_i"][0] == pytest.approx(auc_self, abs=5e-4)
    assert auc_val >= 0.9, result.stdout
    assert auc_self >= 0.95, result.stdout
    assert set(saved["timings"]) >= {"train MLP (L-BFGS)", "validation influence (Up)", "self-influence"}
    assert saved["threads"] == 1
    png = tmp_path / "demo_seed0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick_with_options_and_progress(tmp_path):
    out = tmp_path / "nested" / "dir"
    result = twicediff_cli("demo", "--quick", "--seed", "3", "--regularization", "0.05", "--output", str(out),
                           "--progress")
    assert result.returncode == 0, result.stderr
    assert "train (L-BFGS)" in result.stderr  # the progress bar
    saved = json.loads((out / "demo_seed3.json").read_text())
    assert saved["config"]["n_train"] == 400 and saved["config"]["n_val"] == 100
    assert saved["config"]["regularization"] == 0.05 and saved["config"]["seed"] == 3
    assert saved["num_flipped"] == 40
    assert "(UCI 8x8, seed 3, cpu, float32, 1 CPU thread)" in result.stdout
    assert (out / "demo_seed3.png").stat().st_size > 10_000


def test_demo_arguments_make_the_config():
    from twicediff.app import cli

    parser = cli.build_parser()
    config = cli.demo_config(parser.parse_args(["demo", "--dtype", "float64", "--n-val", "50", "--quick",
                                                "--flip-fraction", "0.2", "--weight-decay", "0", "--no-progress"]))
    assert (config.dtype, config.n_train, config.n_val) == (torch.float64, 400, 50)
    assert (config.flip_fraction, config.weight_decay, config.progress) == (0.2, 0.0, False)
    default = cli.demo_config(parser.parse_args(["demo"]))
    assert (default.n_train, default.n_val, default.regularization, default.dtype) == (1200, 300, 0.03, torch.float32)


def test_bench_prints_rows_as_they_finish_and_writes_files(tmp_path):
    from twicediff.app import bench

    result = twicediff_cli("bench", "--preset", "a", "--directions", "1,4", "--repeats", "1", "--plot", "--json",
                           "--engines", "native,func", "--threads", "1", "--output", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench_a_cpu.json").read_text())
    assert {r["D"] for r in rows} == {1, 4} and {"native", "func", "loop"} <= {r["method"] for r in rows}
    assert "func" in {r["method"] for r in rows} and "autograd" not in {r["method"] for r in rows}
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bench: preset a") and "D = 1, 4" in lines[0]
    assert f"each after {bench.UNTIMED_FIRST} untimed call(s) of the same method" in lines[0]
    assert lines[1] == bench.TABLE_HEADER.splitlines()[0]
    assert [bench.format_row(r) for r in rows] == [line for line in lines if line.startswith("| a |")]
    assert (tmp_path / "bench_a_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_options(capsys):
    assert_usage_error(twicediff_main(capsys, "bench", "--preset", "zz"), "--preset", "a, b", "'zz'")
    assert_usage_error(twicediff_main(capsys, "bench", "--engines", "native,magic"), "--engines", "magic")


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_demo_with_kfac_methods_prints_the_auc_table(tmp_path, method):
    result = twicediff_cli("demo", "--quick", "--method", method, "--output", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    printed = _demo_metrics(result.stdout)
    saved = json.loads((tmp_path / "demo_seed0.json").read_text())
    assert saved["config"]["method"] == method
    assert f"inversion method: {method}" in result.stdout
    assert printed["harm to validation loss"][0] == pytest.approx(saved["metrics"]["validation harm"]["auc"], abs=5e-4)
    # K-FAC's curvature differs from H, but the flipped labels still stand out far above chance (0.5)
    assert saved["metrics"]["self-influence"]["auc"] >= 0.9, result.stdout
    assert saved["metrics"]["validation harm"]["auc"] >= 0.8, result.stdout
    assert f"{method.upper()} factors" in saved["timings"]
    # damped by its own rule, relative to each layer's eigenvalues, not by the exact method's λ
    assert saved["config"]["kfac_damping"] == 0.1
    assert "damping: 0.1 x each layer's mean eigenvalue" in result.stdout


def test_demo_method_argument_and_info_lists_methods(capsys):
    from twicediff.app import cli

    parser = cli.build_parser()
    assert cli.demo_config(parser.parse_args(["demo", "--method", "cg"])).method == "cg"
    assert cli.demo_config(parser.parse_args(["demo"])).method == "direct"
    assert cli.demo_config(parser.parse_args(["demo", "--kfac-damping", "0.3"])).kfac_damping == 0.3
    assert_usage_error(twicediff_main(capsys, "demo", "--method", "bogus"), "--method", "invalid choice")
    result = twicediff_main(capsys, "info")
    assert result.returncode == 0
    assert "inversion methods: direct, cg, lissa, arnoldi, ekfac, kfac" in result.stdout
    facts = json.loads(twicediff_main(capsys, "info", "--json").stdout)
    assert {"direct", "cg", "ekfac", "kfac"} <= set(facts["inversion_methods"])
