"""Build script for cdlm_fast.

The CUDA C++ extension ``cdlm_fast._C`` is compiled whenever nvcc and a CUDA build of
torch are present (a GPU is not needed to build). Environment variables:

* ``CDLM_FAST_BUILD_CUDA``: ``auto`` (default: build if possible, install without it if the
  build fails), ``1`` (a missing toolchain or a failed build is an error), ``0`` (skip).
* ``CDLM_FAST_BUILD_CPU``: the same for the small C++ CPU extension ``cdlm_fast._cpu`` (the
  decode call of the torch attention backend without Python overhead; needs only a C++
  compiler and torch). Without it that call runs in Python, a few percent slower.
* ``CDLM_FAST_CUDA_ARCHS``: semicolon-separated SM targets, default ``80;90a``.
* ``MAX_JOBS``: parallel compile jobs (ninja), as in PyTorch.
* ``CUDA_HOME``: the CUDA toolkit; found from ``/usr/local/cuda`` or ``nvcc`` on PATH otherwise.

Build with ``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch that is already installed.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("CDLM_FAST_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"CDLM_FAST_BUILD_CUDA must be auto, 0 or 1, got {MODE!r}")
CPU_MODE = os.environ.get("CDLM_FAST_BUILD_CPU", "auto").strip().lower()
if CPU_MODE not in ("auto", "0", "1"):
    sys.exit(f"CDLM_FAST_BUILD_CPU must be auto, 0 or 1, got {CPU_MODE!r}")


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _cutlass_include():
    """CUTLASS/CuTe headers from the ``nvidia-cutlass`` wheel (or ``CUTLASS_INCLUDE``)."""
    if os.environ.get("CUTLASS_INCLUDE"):
        return os.environ["CUTLASS_INCLUDE"]
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(os.path.join(path, "cute")) else None


def _arch_flags():
    archs = [a.strip() for a in os.environ.get("CDLM_FAST_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _cuda_extension():
    """``(extension, None)`` for the CUDA extension, or ``(None, reason)``."""
    if MODE == "0":
        return None, "CDLM_FAST_BUILD_CUDA=0"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return None, "nvcc not found (set CUDA_HOME)"
    os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError as e:
        return None, f"torch is not importable ({e}); install torch first and use --no-build-isolation"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return None, "no sources in csrc/"
    include_dirs = [os.path.join(ROOT, "csrc")]
    cutlass = _cutlass_include()
    if cutlass is None:
        return None, "CUTLASS headers not found: pip install nvidia-cutlass (or set CUTLASS_INCLUDE)"
    include_dirs.append(cutlass)
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
                  "--expt-extended-lambda", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  "-DNDEBUG", "-lineinfo"] + _arch_flags()
    ext = CUDAExtension(
        name="cdlm_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-DNDEBUG"], "nvcc": nvcc_flags},
    )
    return ext, None


def _cpu_extension():
    """``(extension, None)`` for the C++ CPU extension ``cdlm_fast._cpu``, or ``(None, reason)``."""
    if CPU_MODE == "0":
        return None, "CDLM_FAST_BUILD_CPU=0"
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as e:
        return None, f"torch is not importable ({e}); install torch first and use --no-build-isolation"
    return CppExtension(name="cdlm_fast._cpu", sources=[os.path.join("csrc", "cpu", "decode.cpp")],
                        extra_compile_args=["-O2", "-std=c++20", "-DNDEBUG"]), None


# extension -> (how it is made, its mode, the variable that sets the mode, what it is)
EXTENSIONS = {
    "cdlm_fast._C": (_cuda_extension, MODE, "CDLM_FAST_BUILD_CUDA", "the CUDA extension"),
    "cdlm_fast._cpu": (_cpu_extension, CPU_MODE, "CDLM_FAST_BUILD_CPU", "the C++ CPU extension"),
}


def _build_ext():
    """A ``build_ext`` that compiles each extension once at install time; in ``auto`` mode (of that
    extension's variable) a failed build only warns and the package installs without it."""
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extensions(self):
            self._failed = set()
            super().build_extensions()
            # a failed extension has no file to install or to copy into an editable install's tree
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, extension):
            _, mode, var, what = EXTENSIONS[extension.name]
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if mode == "1":
                    raise
                self._failed.add(extension.name)
                print(f"WARNING: {extension.name} failed to build ({e}); installing without {what}. "
                      f"Set {var}=1 to make this an error.", file=sys.stderr)

    return Build.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, cmdclass = [], {}
for _make, _mode, _var, _what in EXTENSIONS.values():
    _ext, _reason = _make()
    if _ext is not None:
        ext_modules.append(_ext)
    elif _mode == "1":
        sys.exit(f"{_var}=1 but {_what} cannot be built: {_reason}")
    else:
        print(f"cdlm_fast: building without {_what}: {_reason}", file=sys.stderr)
if ext_modules:
    cmdclass = {"build_ext": _build_ext()}

packages = find_packages(include=["cdlm_fast", "cdlm_fast.*"]) + ["cdlm_fast.kernels"]

setup(
    name="cdlm_fast",
    version="0.1.0",
    description="Block-causal biased attention, batched NNLS / least squares, CDLM decoding and "
                "Attention Matching KV compaction, in Triton and CUDA C++",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"cdlm_fast.kernels": "kernels"},
    package_data={"cdlm_fast": ["data/*.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "transformers>=5.17", "gguf", "accelerate",
                 "matplotlib", "peft", "safetensors"],
        "hf": ["transformers>=5.17", "gguf", "accelerate", "safetensors"],
        "peft": ["transformers>=5.17", "accelerate", "safetensors", "peft"],
        "bench": ["pytest", "pytest-benchmark", "scipy", "matplotlib"],
    },
    entry_points={"console_scripts": ["cdlm-fast=cdlm_fast.cli:main"]},
    zip_safe=False,
)
