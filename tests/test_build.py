"""The build record, the import-time compatibility check and the op registrations.

The subprocess tests copy the package that is being tested (compiled extension included) into a
temporary folder, break one thing in the copy and import it with a fresh interpreter: this is what
a user sees when a wheel meets the wrong torch, not a simulation of it.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import twicediff
from twicediff import _build, _build_config

BUILD_INFO_TYPES = {
    "torch": str,
    "torch_runtime": str,
    "cuda": (str, type(None)),
    "cuda_archs": list,
    "cuda_kernels": bool,
    "gpu_available": bool,
    "nvcc": (str, type(None)),
    "sanitize": (str, type(None)),
    "cpu_gemm": str,
    "cpu_gemm_refusal": str,
    "probe": dict,
    "cpu_matmul_route": dict,
    "engine": (str, type(None)),
    "compiled": list,
}


def test_build_info_keys_and_types():
    info = twicediff.build_info()
    assert set(info) == set(BUILD_INFO_TYPES)
    for key, types in BUILD_INFO_TYPES.items():
        assert isinstance(info[key], types), (key, info[key])
    assert all(re.fullmatch(r"sm_\d+", a) for a in info["cuda_archs"]), info["cuda_archs"]
    assert info["torch_runtime"] == torch.__version__
    assert info["cpu_gemm"] in ("onednn", "blas")
    assert info["cpu_gemm"] == "blas" or not info["cpu_gemm_refusal"]  # a refusal sends the GEMMs to BLAS
    assert set(info["cpu_matmul_route"]) == {"classes", "onednn", "seconds"}
    assert 0 <= info["cpu_matmul_route"]["onednn"] <= info["cpu_matmul_route"]["classes"]


def test_build_info_agrees_with_the_record_and_the_module():
    info = twicediff.build_info()
    # _C.cuda_kernels is compiled into the module; the record is written by CMake: they must agree.
    assert info["cuda_kernels"] is bool(_build_config.CUDA_KERNELS) is bool(_build._C.cuda_kernels)
    assert info["torch"] == _build_config.TORCH_VERSION
    if info["cuda_kernels"]:
        assert info["cuda"] == torch.version.cuda
        assert info["cuda_archs"] and info["nvcc"]
    else:
        assert info["cuda"] is None and info["cuda_archs"] == [] and not info["gpu_available"]


def _twicediff_op_names():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("twicediff::"))


def _has_kernel(name, key):
    # A kernel for every device (that of an op without tensor arguments) serves `key` too.
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k)
               for k in (key, "CompositeImplicitAutograd", "CompositeExplicitAutograd"))


def test_every_op_has_a_cpu_kernel():
    names = _twicediff_op_names()
    assert names, "no twicediff:: op is registered"
    missing = [n for n in names if not _has_kernel(n, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


@pytest.mark.skipif(not twicediff.build_info()["cuda_kernels"], reason="built without CUDA kernels")
def test_every_op_has_a_cuda_kernel_when_built_with_cuda():
    missing = [n for n in _twicediff_op_names() if not _has_kernel(n, "CUDA")]
    assert not missing, f"ops without a CUDA kernel although cuda_kernels is True: {missing}"


# ---- the compatibility check as a function ------------------------------------------------------


@pytest.mark.parametrize("built, running", [
    (("2.14.1+cu130", "13.0"), ("2.14.1+cu130", "13.0")),
    (("2.14.0+cu130", "13.0"), ("2.14.1+cu130", "13.0")),   # patch releases keep the ABI
    (("2.14.1+cu130", None), ("2.14.1+cu130", "13.0")),     # CPU-only build under a CUDA torch
    (("2.11.0", None), ("2.11.0+cpu", None)),
])
def test_check_compatible_accepts(built, running):
    _build.check_compatible(*built, *running)


def test_check_compatible_names_found_expected_and_rebuild_for_another_torch():
    with pytest.raises(ImportError) as err:
        _build.check_compatible("2.11.0+cu130", "13.0", "2.14.1+cu130", "13.0")
    msg = str(err.value)
    assert "built against torch 2.11.0+cu130" in msg          # what the build was made for
    assert "torch 2.14.1+cu130 is installed" in msg            # what was found
    assert "expected torch 2.11.x" in msg                      # what is expected
    assert "pip install --no-build-isolation" in msg           # how to rebuild
    assert "Wheels for CUDA targets" in msg


def test_check_compatible_names_found_expected_and_rebuild_for_a_cpu_only_torch():
    with pytest.raises(ImportError) as err:
        _build.check_compatible("2.14.1+cu130", "13.0", "2.14.1+cpu", None)
    msg = str(err.value)
    assert "CUDA 13.0 kernels" in msg
    assert "2.14.1+cpu is a CPU-only build" in msg
    assert "expected a CUDA build of torch" in msg
    assert "pip install --no-build-isolation" in msg


# ---- the check as a user meets it: a copy of the package, broken, imported afresh ---------------


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the twicediff package under test (with its compiled _C) in tmp_path/twicediff."""
    src = os.path.dirname(twicediff.__file__)
    dst = tmp_path / "twicediff"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _import_in_fresh_interpreter(path):
    env = dict(os.environ, PYTHONPATH=str(path), PYTHONDONTWRITEBYTECODE="1")
    code = textwrap.dedent("""
        import twicediff, os
        assert os.path.dirname(twicediff.__file__) == os.path.join(os.getcwd(), "twicediff"), \\
            twicediff.__file__
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_copy_imports_when_nothing_is_broken(package_copy):
    proc = _import_in_fresh_interpreter(package_copy.parent)
    assert proc.returncode == 0, proc.stderr


def test_import_with_a_faked_recorded_torch_version_says_what_and_how(package_copy):
    config = package_copy / "_build_config.py"
    text = config.read_text()
    faked, n = re.subn(r'^TORCH_VERSION = ".*"$', 'TORCH_VERSION = "1.13.1+cu117"', text, flags=re.M)
    assert n == 1, text
    config.write_text(faked)
    proc = _import_in_fresh_interpreter(package_copy.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: twicediff's compiled extension was built against torch "
                           "1.13.1+cu117"), proc.stderr
    assert f"torch {torch.__version__} is installed (expected torch 1.13.x)" in last
    assert "pip install --no-build-isolation" in last
    assert "undefined symbol" not in proc.stderr


def test_import_without_the_build_record_says_the_extension_is_missing(package_copy):
    (package_copy / "_build_config.py").unlink()
    proc = _import_in_fresh_interpreter(package_copy.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: twicediff's compiled extension (twicediff._C) is missing"), \
        proc.stderr
    assert "pip install --no-build-isolation" in last


def test_import_with_the_record_but_no_module_says_it_could_not_be_loaded(package_copy):
    libs = list(package_copy.glob("_C.*"))
    assert libs, list(package_copy.iterdir())
    for lib in libs:
        lib.unlink()
    proc = _import_in_fresh_interpreter(package_copy.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "twicediff._C could not be loaded although it was built for torch" in last, proc.stderr
    assert "pip install --no-build-isolation" in last


# ---- the wheel's local version tag (scripts/tag_wheel.py) ---------------------------------------


def _load_tag_wheel():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "tag_wheel.py")
    spec = importlib.util.spec_from_file_location("tag_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_untagged_wheel(path, build_config):
    import zipfile
    files = {
        "twicediff/__init__.py": "x = 1\n",
        "twicediff/_C.cpython-311-x86_64-linux-gnu.so": "stands for the compiled module",
        "twicediff-0.1.0.dist-info/METADATA": ("Metadata-Version: 2.1\nName: twicediff\nVersion: 0.1.0\n"
                                               "Requires-Dist: torch>=2.11\nRequires-Dist: numpy\n"),
        "twicediff-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nTag: cp311-cp311-linux_x86_64\n",
        "twicediff-0.1.0.dist-info/RECORD": "stale\n",
    }
    if build_config is not None:
        files["twicediff/_build_config.py"] = build_config
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return files


@pytest.mark.parametrize("record, tag", [
    ('TORCH_VERSION = "2.14.1+cu130"\nCUDA_VERSION = \'13.0\'\nCUDA_KERNELS = True\n', "pt2141cu130"),
    ('TORCH_VERSION = "2.11.0+cu130"\nCUDA_VERSION = None\nCUDA_KERNELS = False\n', "pt2110cpu"),
], ids=["cu130", "cpu"])
def test_tag_wheel_names_torch_and_cuda_and_rewrites_metadata_and_record(tmp_path, record, tag):
    import base64
    import hashlib
    import zipfile
    tag_wheel = _load_tag_wheel()
    src = tmp_path / "twicediff-0.1.0-cp311-cp311-linux_x86_64.whl"
    files = _write_untagged_wheel(src, record)
    out = tag_wheel.tag_wheel(str(src), str(tmp_path / "out"))
    assert os.path.basename(out) == f"twicediff-0.1.0+{tag}-cp311-cp311-linux_x86_64.whl"
    info = f"twicediff-0.1.0+{tag}.dist-info/"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert not any(n.startswith("twicediff-0.1.0.dist-info/") for n in names)
        metadata = z.read(info + "METADATA").decode()
        assert f"\nVersion: 0.1.0+{tag}\n" in metadata
        series = "2.14" if tag.startswith("pt214") else "2.11"
        assert f"Requires-Dist: torch=={series}.*\n" in metadata and "Requires-Dist: numpy" in metadata
        for name, text in files.items():
            if "dist-info" not in name:
                assert z.read(name) == text.encode()
        record_lines = z.read(info + "RECORD").decode().splitlines()
        assert sorted(line.split(",")[0] for line in record_lines) == sorted(names)
        for line in record_lines:
            name, digest, size = line.split(",")
            if name == info + "RECORD":
                assert digest == size == ""
                continue
            data = z.read(name)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expect}" and int(size) == len(data), name


def test_tag_wheel_refuses_a_wheel_without_a_build_record_or_already_tagged(tmp_path):
    tag_wheel = _load_tag_wheel()
    src = tmp_path / "twicediff-0.1.0-cp311-cp311-linux_x86_64.whl"
    _write_untagged_wheel(src, None)
    with pytest.raises(ValueError, match="holds no twicediff/_build_config.py"):
        tag_wheel.tag_wheel(str(src), str(tmp_path / "out"))
    tagged = tmp_path / "twicediff-0.1.0+pt2141cpu-cp311-cp311-linux_x86_64.whl"
    tagged.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"without a local version tag, got version '0.1.0\+pt2141cpu'"):
        tag_wheel.tag_wheel(str(tagged), str(tmp_path / "out"))
