"""Write a CMake file of set() lines describing the installed torch (argv[1] is its path).

Run by CMakeLists.txt with the interpreter that will import twicediff, so the extension is always
compiled against the torch that will load it.
"""
import glob
import os
import sys

import torch

torch_dir = os.path.dirname(torch.__file__)
site = os.path.dirname(torch_dir)
# ATen's CUDA headers include cublas_v2.h / cusparse.h, which the pip CUDA wheels ship and a
# minimal toolkit may not: collect the include folders of the nvidia wheels beside torch.
cuda_inc = sorted({os.path.dirname(h) for pat in ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
                   for h in glob.glob(os.path.join(site, "nvidia", "**", "include", pat), recursive=True)})
facts = {
    "TORCH_DIR": torch_dir,
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": str(torch.version.cuda),
    "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    "TORCH_LIB_DIR": os.path.join(torch_dir, "lib"),
    "TORCH_INCLUDE_DIRS": ";".join([os.path.join(torch_dir, "include"),
                                    os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]),
    "TORCH_CUDA_INCLUDE_DIRS": ";".join(cuda_inc),
}
with open(sys.argv[1], "w") as f:
    for k, v in facts.items():
        f.write(f'set({k} "{v}")\n')
