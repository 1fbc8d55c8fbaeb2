"""Give a built twicediff wheel the local version tag of what it was compiled against.

    python scripts/tag_wheel.py DIST/twicediff-0.1.0-cp311-cp311-linux_x86_64.whl OUTDIR
    -> OUTDIR/twicediff-0.1.0+pt2141cu130-cp311-cp311-linux_x86_64.whl   (path printed)

The tag is read from the wheel's own build record, twicediff/_build_config.py (written by CMake
when _C was compiled), so it cannot disagree with what the import-time check will compare:
``pt`` + torch's release digits (2.14.1 -> 2141), then ``cu`` + the CUDA version's digits
(13.0 -> 130) when the CUDA kernels were compiled in, else ``cpu``. The torch requirement is
narrowed to the release series the extension was built for (``torch==2.14.*``), so that pip does
not pair the wheel with another torch. The dist-info folder, METADATA and RECORD (hashes and sizes)
are rewritten; every other entry is copied byte for byte.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import zipfile


def local_tag(torch_version: str, cuda_version, cuda_kernels: bool) -> str:
    """``pt2141cu130`` for torch 2.14.1 with CUDA 13.0 kernels; ``pt2141cpu`` without."""
    release = re.match(r"\d+(\.\d+)*", torch_version)
    if release is None:
        raise ValueError(f"torch_version: expected a version such as '2.14.1+cu130', got {torch_version!r}")
    tag = "pt" + release.group(0).replace(".", "")
    if cuda_kernels:
        if not cuda_version:
            raise ValueError(f"cuda_version: expected a version such as '13.0' when cuda_kernels is "
                             f"True, got {cuda_version!r}")
        return tag + "cu" + str(cuda_version).replace(".", "")
    return tag + "cpu"


def read_build_record(wheel: zipfile.ZipFile) -> dict:
    """The variables of twicediff/_build_config.py inside the wheel."""
    try:
        source = wheel.read("twicediff/_build_config.py").decode()
    except KeyError:
        raise ValueError(f"{wheel.filename}: holds no twicediff/_build_config.py; was it built by "
                         "scikit-build-core from this source tree?") from None
    record: dict = {}
    exec(compile(source, "twicediff/_build_config.py", "exec"), {}, record)
    return record


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def tag_wheel(path: str, outdir: str) -> str:
    """Write the tagged copy of the wheel at ``path`` into ``outdir``; return its path."""
    name = os.path.basename(path)
    m = re.fullmatch(r"(?P<dist>[^-]+)-(?P<ver>[^-]+)-(?P<rest>.+)\.whl", name)
    if m is None:
        raise ValueError(f"path: expected a wheel file name 'dist-version-tags.whl', got {name!r}")
    dist, version = m["dist"], m["ver"]
    if "+" in version:
        raise ValueError(f"path: expected a wheel without a local version tag, got version {version!r}")
    with zipfile.ZipFile(path) as src:
        record = read_build_record(src)
        tag = local_tag(record["TORCH_VERSION"], record["CUDA_VERSION"], bool(record["CUDA_KERNELS"]))
        new_version = f"{version}+{tag}"
        old_info, new_info = f"{dist}-{version}.dist-info/", f"{dist}-{new_version}.dist-info/"
        series = ".".join(re.match(r"\d+(\.\d+)*", record["TORCH_VERSION"]).group(0).split(".")[:2])
        out_path = os.path.join(outdir, f"{dist}-{new_version}-{m['rest']}.whl")
        os.makedirs(outdir, exist_ok=True)
        lines = []
        with zipfile.ZipFile(out_path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename == old_info + "RECORD":
                    continue
                data = src.read(info)
                new_name = info.filename.replace(old_info, new_info, 1)
                if info.filename == old_info + "METADATA":
                    text, n = re.subn(rf"^Version: {re.escape(version)}$", f"Version: {new_version}",
                                      data.decode(), count=1, flags=re.M)
                    if n != 1:
                        raise ValueError(f"{path}: METADATA has no 'Version: {version}' line")
                    text = re.sub(r"^Requires-Dist: torch\b[^;\n]*", f"Requires-Dist: torch=={series}.*",
                                  text, count=1, flags=re.M)
                    data = text.encode()
                new = zipfile.ZipInfo(new_name, date_time=info.date_time)
                new.external_attr, new.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
                dst.writestr(new, data)
                lines.append(_record_line(new_name, data))
            lines.append(f"{new_info}RECORD,,")
            dst.writestr(new_info + "RECORD", "\n".join(lines) + "\n")
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", help="a twicediff wheel without a local version tag")
    parser.add_argument("outdir", help="folder for the tagged wheel")
    args = parser.parse_args(argv)
    print(tag_wheel(args.wheel, args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
