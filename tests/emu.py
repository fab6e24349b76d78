"""The CUDA code of csrc/ built as host C++ against the emulator (csrc/emu/).

    python tests/emu.py [--sanitize thread|address] [--selftest]   # build, print its path

`build()` compiles csrc/cuda/*.cu (as C++), csrc/cuda/*.cpp, csrc/ops.cpp and
csrc/emu/*.cpp with LSTM_FUSED_EMU into one shared library, cached in
build/emu/<variant>-<hash> by the content of every file under csrc/ (and the
flags and torch version): editing a kernel and rerunning rebuilds it, nothing
is installed. `load()` loads it into a process that imported lstm_fused:
the ops' CPU implementation is then the CUDA host code (csrc/cuda/
lstm_cuda_ops.cpp) launching the CUDA kernels on the emulator, CPU tensors in
and out, float16/bfloat16 computed by the kernels as on a GPU, and every
tensor at::empty allocates filled with NaN. Load it only in
a process of its own (tests/test_cuda_emu.py runs the CUDA suite in
subprocesses). `environment()` is what such a process needs for a sanitized
build: the sanitizer's runtime preloaded into Python.
"""
import argparse
import concurrent.futures
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SANITIZERS = {
    None: [],
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                "-fno-omit-frame-pointer"],
}
RUNTIMES = {"thread": "libtsan.so", "address": "libasan.so"}


def _compiler():
    return os.environ.get("CXX", "g++")


def _flags(sanitize):
    import torch
    from torch.utils import cpp_extension
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{CSRC}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    compile_flags = (["-std=c++20", "-fPIC", "-O1", "-g", "-DLSTM_FUSED_EMU",
                      f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Wall", "-Wno-unknown-pragmas"]
                     + SANITIZERS[sanitize] + includes)
    libs = cpp_extension.library_paths()
    link_flags = (["-shared"] + SANITIZERS[sanitize] + [f"-L{p}" for p in libs]
                  + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"])
    return compile_flags, link_flags


def _sources(selftest):
    runtime = sorted((CSRC / "emu").glob("*.cpp"))
    if selftest:
        return runtime + [CSRC / "emu" / "selftest.cu"]
    return (sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
            + [CSRC / "ops.cpp"] + runtime)


def _key(sanitize, flags):
    import torch
    h = hashlib.sha256()
    for f in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(CSRC)).encode())
        h.update(f.read_bytes())
    h.update(repr((flags, _compiler(), torch.__version__)).encode())
    return f"{sanitize or 'plain'}-{h.hexdigest()[:16]}"


def build(sanitize=None, selftest=False, jobs=None, verbose=False):
    """Path of the emulated library for `sanitize` (None, "thread" or
    "address"), built if its cached copy is missing. selftest: instead, the
    emulator with the kernels of csrc/emu/selftest.cu (ops of
    lstm_fused_emu_selftest; it replaces nothing, so any process may load it)."""
    compile_flags, link_flags = _flags(sanitize)
    kind = "selftest-" if selftest else ""
    out = ROOT / "build" / "emu" / (kind + _key(sanitize, (compile_flags, link_flags)))
    lib = out / "liblstm_fused_emu.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)

    def compile_one(src):
        # A .cu file compiles as C++: through a .cpp that includes it.
        unit = src
        if src.suffix == ".cu":
            unit = out / f"{src.stem}.cu.cpp"
            unit.write_text(f'#include "{src}"\n')
        obj = out / f"{src.parent.name}_{src.stem}.o"
        cmd = [_compiler(), *compile_flags, "-c", str(unit), "-o", str(obj)]
        if verbose:
            print(shlex.join(cmd), file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"emulated build failed: {shlex.join(cmd)}\n{run.stderr}")
        return obj

    jobs = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_one, _sources(selftest)))
    tmp = out / "liblstm_fused_emu.so.tmp"
    cmd = [_compiler(), *map(str, objects), *link_flags, "-o", str(tmp)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"emulated link failed: {shlex.join(cmd)}\n{run.stderr}")
    tmp.rename(lib)  # complete or absent: a cache hit is never half a build
    _prune(out)
    return lib


def _prune(keep, count=2):
    """Drop all but the `count` newest builds of keep's variant."""
    import shutil
    variant = keep.name.rsplit("-", 1)[0]
    builds = sorted((d for d in keep.parent.iterdir()
                     if d.is_dir() and d.name.rsplit("-", 1)[0] == variant),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in builds[count:]:
        shutil.rmtree(old, ignore_errors=True)


def runtime(sanitize):
    """The sanitizer runtime to preload into Python for a sanitized build."""
    name = RUNTIMES[sanitize]
    path = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"{_compiler()} has no {name}")
    return path


def environment(lib, sanitize=None, **extra):
    """The environment of a process that runs the CUDA suite on `lib`."""
    env = dict(os.environ, LSTM_FUSED_TEST_DEVICE="emu", LSTM_FUSED_EMU_LIB=str(lib),
               **{k: str(v) for k, v in extra.items()})
    if sanitize is not None:
        env["LD_PRELOAD"] = runtime(sanitize)
        # Python and torch are not instrumented: no leak report of theirs.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
        env["TSAN_OPTIONS"] = "halt_on_error=1:second_deadlock_stack=1"
        env["OMP_NUM_THREADS"] = "1"  # ATen's OpenMP threads are not instrumented
    return env


def load(lib):
    """In a process that imported lstm_fused: the ops' CPU implementation
    becomes the emulated CUDA one (torch warns that it overrides the kernels)."""
    import warnings

    import torch

    import lstm_fused.modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ops.load_library(str(lib))
    lstm_fused.modules._HALF_NATIVE.add("cpu")  # the kernels take half types, as on a GPU
    lstm_fused.ops.PAIR_DEVICES.add("cpu")  # bidirectional layers in one call, as on a GPU
    # Every tensor from at::empty (the host code's outputs and workspaces)
    # starts as NaN (max int for integers): a read of what no kernel wrote shows.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sanitize", choices=["thread", "address"])
    parser.add_argument("--selftest", action="store_true", help="the emulator's own test kernels")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(build(args.sanitize, selftest=args.selftest, verbose=args.verbose))


if __name__ == "__main__":
    main()
