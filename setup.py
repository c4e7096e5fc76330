"""Build glue: setuptools drives CMake to compile the pybind11 extension ``klotski._C``.

The extension links to neither torch nor CUDA (CUDA is dlopen'd at run time), so it builds with g++ alone.
The top-level ``triton_kernels/`` folder installs as ``klotski.triton_kernels``.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("KLOTSKI_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DKLOTSKI_EXT_FILENAME={out_path.name}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        subprocess.run(["cmake", ext.source_dir, *args], cwd=build_dir, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=find_packages(include=["klotski", "klotski.*"])
    + ["klotski.triton_kernels"]
    + [f"klotski.triton_kernels.{p}" for p in find_packages("triton_kernels")],
    package_dir={"klotski": "klotski", "klotski.triton_kernels": "triton_kernels"},
    # the trained demo model (bench/quality/train_tiny_moe.py), shipped so `klotski demo` needs no download
    package_data={"klotski.triton_kernels": ["configs/*.json"], "klotski": ["assets/tiny_moe/*"]},
    ext_modules=[CMakeExtension("klotski._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
