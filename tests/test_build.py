"""Which extension the build picks (build_support/cuda_detect.py), on fake
toolkits: shell scripts as nvcc, folders with or without the headers. Nothing
is compiled. Then setup.py's use of the decision, and lstm_fused.build_info()
against what this process sees."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lstm_fused

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_support"))
import cuda_detect  # noqa: E402

LIBS = cuda_detect.LIBRARY_HEADERS
NVCC = """#!/bin/sh
here=${{0%/*}}
for a in "$@"; do
  case $a in
    --version) echo "Cuda compilation tools, release {release}, V{release}.1"; exit 0;;
    -dryrun) {dryrun} exit 0;;
  esac
done
exit 1
"""
DRYRUN = 'echo "#\\$ _HERE_=$here" >&2; echo "#\\$ TOP=$here/.." >&2;'


def script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def toolkit(root, release="13.0", headers=("cuda_runtime_api.h", "crt/host_defines.h"),
            reports=True):
    """A fake toolkit: bin/nvcc, which prints `release X.Y` and, if reports,
    its folder under -dryrun as the real one does, and the given headers."""
    script(root / "bin" / "nvcc", NVCC.format(release=release, dryrun=DRYRUN if reports else ""))
    for h in headers:
        (root / "include" / h).parent.mkdir(parents=True, exist_ok=True)
        (root / "include" / h).write_text("")
    return root


def wrapper(path, target):
    """A bin/nvcc that only execs target, like /usr/local/bin/nvcc on our VMs."""
    return script(path, f'#!/bin/sh\nexec "{target}" "$@"\n')


@pytest.fixture
def site(tmp_path):
    """torch's nvidia wheel headers as in torch 2.14: one partial set (a
    cuda_runtime_api.h without crt/) with the library headers."""
    inc = tmp_path / "site" / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    for h in LIBS + ("cuda_runtime_api.h",):
        (inc / h).write_text("")
    return tmp_path / "site"


def decide(torch_cuda="13.0", path=(), site=None, default_home="/nonexistent", **env):
    env = {"PATH": os.pathsep.join(map(str, path)), **env}
    return cuda_detect.decide(torch_cuda, env, [site] if site else [],
                              default_home=str(default_home))


def test_toolkit_on_path(tmp_path, site):
    tk = toolkit(tmp_path / "cuda")
    d = decide(path=[tk / "bin"], site=site)
    assert d.cuda and d.cuda_home == str(tk) and d.cuda_version == "13.0"
    # The toolkit's own headers first, the wheel's partial set after them.
    assert d.include_dirs == [str(tk / "include"), str(site / "nvidia" / "cu13" / "include")]
    assert str(tk) in d.reason and d.line().startswith("lstm_fused: building the CUDA extension")


def test_wrapper_nvcc_finds_the_toolkit_behind_it(tmp_path, site):
    """The issue's machine: nvcc on PATH is a script in a folder with no
    toolkit; nvcc itself names the real one."""
    tk = toolkit(tmp_path / "cuda-13.0")
    bin_ = wrapper(tmp_path / "local" / "bin" / "nvcc", tk / "bin" / "nvcc").parent
    d = decide(path=[bin_], site=site)
    assert d.cuda and d.cuda_home == str(tk)
    assert d.include_dirs[0] == str(tk / "include")
    assert f"nvcc at {bin_ / 'nvcc'}" in d.reason


def test_symlinked_nvcc_is_resolved(tmp_path, site):
    """An nvcc that reports no folder: its link is followed to bin/.."""
    tk = toolkit(tmp_path / "cuda", reports=False)
    link = tmp_path / "usr" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(tk / "bin" / "nvcc")
    d = decide(path=[link.parent], site=site)
    assert d.cuda and d.cuda_home == str(tk)


def test_wrapper_hiding_the_toolkit(tmp_path, site):
    hidden = toolkit(tmp_path / "hidden", reports=False)
    bin_ = wrapper(tmp_path / "local" / "bin" / "nvcc", hidden / "bin" / "nvcc").parent
    d = decide(path=[bin_], site=site)
    assert not d.cuda
    assert f"{tmp_path / 'local'} lacks include/cuda_runtime_api.h" in d.reason
    assert d.line().startswith("lstm_fused: building the CPU-only extension: ")


def test_the_default_location_when_nvcc_is_not_on_path(tmp_path, site):
    tk = toolkit(tmp_path / "cuda")
    d = decide(site=site, default_home=tk)
    assert d.cuda and d.cuda_home == str(tk) and "default location" in d.reason


def test_toolkit_without_crt(tmp_path, site):
    """Headers like those of torch's wheel: cuda_runtime_api.h, no crt/."""
    tk = toolkit(tmp_path / "cuda", headers=("cuda_runtime_api.h",))
    d = decide(path=[tk / "bin"], site=site)
    assert not d.cuda and f"{tk} lacks include/crt/host_defines.h" in d.reason


def test_cuda_home_is_taken_as_given(tmp_path, site):
    """$CUDA_HOME wins over nvcc on PATH, and is checked like any other."""
    good = toolkit(tmp_path / "good")
    bad = toolkit(tmp_path / "bad", headers=())
    assert decide(path=[bad / "bin"], site=site, CUDA_HOME=str(good)).cuda_home == str(good)
    d = decide(path=[good / "bin"], site=site, CUDA_HOME=str(bad))
    assert not d.cuda and d.reason.startswith("$CUDA_HOME: ") and str(bad) in d.reason
    d = decide(site=site, CUDA_PATH=str(tmp_path / "none"))
    assert not d.cuda and f"{tmp_path / 'none'} has no bin/nvcc" in d.reason


@pytest.mark.parametrize("release,ok", [("12.8", False), ("14.0", False), ("13.2", True)])
def test_major_version_must_match_torch(tmp_path, site, release, ok):
    tk = toolkit(tmp_path / "cuda", release=release)
    d = decide("13.0", path=[tk / "bin"], site=site)
    if ok:
        assert d.cuda and d.cuda_version == release
    else:
        assert not d.cuda and f"nvcc {release}" in d.reason and "torch's CUDA 13.0" in d.reason


def test_cpu_only_torch(tmp_path, site):
    tk = toolkit(tmp_path / "cuda")
    d = decide(None, path=[tk / "bin"], site=site)
    assert not d.cuda and "CPU-only build" in d.reason


def test_no_toolkit_anywhere():
    d = decide()
    assert not d.cuda and "no nvcc on PATH" in d.reason


def test_library_headers(tmp_path, site):
    """cuBLAS & co. from the toolkit when it has them, else from the wheels,
    else CPU-only, naming the header."""
    full = toolkit(tmp_path / "full", headers=cuda_detect.TOOLKIT_HEADERS + LIBS)
    assert decide(path=[full / "bin"], site=site).include_dirs == [str(full / "include")]
    bare = toolkit(tmp_path / "bare")
    d = decide(path=[bare / "bin"])
    assert not d.cuda and "no cublas_v2.h" in d.reason


def test_nvcc_without_a_version(tmp_path):
    tk = toolkit(tmp_path / "cuda")
    script(tk / "bin" / "nvcc", "#!/bin/sh\necho nonsense\n")
    d = decide(path=[tk / "bin"])
    assert not d.cuda and "names no release" in d.reason


def test_force_cpu(tmp_path, site):
    tk = toolkit(tmp_path / "cuda")
    d = decide(path=[tk / "bin"], site=site, LSTM_FUSED_FORCE_CPU="1")
    assert not d.cuda and d.reason == "LSTM_FUSED_FORCE_CPU=1"


@pytest.mark.parametrize("case,missing", [
    ("no crt", "include/crt/host_defines.h"), ("major", "nvcc 12.8"),
    ("cpu torch", "CPU-only build"), ("nothing", "no nvcc on PATH"),
    ("no cublas", "no cublas_v2.h")])
def test_force_cuda_fails_naming_what_is_missing(tmp_path, site, case, missing):
    headers = ("cuda_runtime_api.h",) if case == "no crt" else cuda_detect.TOOLKIT_HEADERS
    tk = toolkit(tmp_path / "cuda", release="12.8" if case == "major" else "13.0", headers=headers)
    kw = dict(path=[] if case == "nothing" else [tk / "bin"],
              site=None if case == "no cublas" else site)
    with pytest.raises(cuda_detect.ForcedCudaError, match="LSTM_FUSED_FORCE_CUDA=1, but") as e:
        decide(None if case == "cpu torch" else "13.0", LSTM_FUSED_FORCE_CUDA="1", **kw)
    assert missing in str(e.value)
    # Without the switch: the CPU-only build, for the same reason.
    d = decide(None if case == "cpu torch" else "13.0", **kw)
    assert not d.cuda and missing in d.reason


def run_setup(env):
    """setup.py's module code with setuptools.setup() replaced: which
    extension it would build and with what. Compiles nothing."""
    code = """
import json, runpy, setuptools
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
g = runpy.run_path("setup.py", run_name="__main__")
ext = seen["ext_modules"][0]
print(json.dumps({"cuda": any(s.endswith(".cu") for s in ext.sources),
                  "include_dirs": ext.include_dirs,
                  "cuda_home": g["cpp_extension"].CUDA_HOME, "line": g["DECISION"].line()}))
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH") and not k.startswith("LSTM_FUSED_FORCE")} | env
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_setup_uses_the_decision(tmp_path):
    """setup.py builds what decide() says, hands cpp_extension the toolkit it
    chose and puts the toolkit's include folder before all others."""
    release = torch.version.cuda or "13.0"
    tk = toolkit(tmp_path / "cuda", release=release, headers=cuda_detect.TOOLKIT_HEADERS + LIBS)
    bin_ = wrapper(tmp_path / "local" / "bin" / "nvcc", tk / "bin" / "nvcc").parent
    rc, out, err = run_setup({"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"})
    assert rc == 0, err
    got = json.loads(out.splitlines()[-1])
    if torch.version.cuda is None:
        assert not got["cuda"] and "CPU-only build" in got["line"]
    else:
        assert got["cuda"] and got["cuda_home"] == str(tk)
        assert got["include_dirs"][0] == str(tk / "include")


def test_setup_force_cuda_is_an_error(tmp_path):
    rc, out, err = run_setup({"LSTM_FUSED_FORCE_CUDA": "1", "CUDA_HOME": str(tmp_path)})
    assert rc != 0
    assert "lstm_fused: LSTM_FUSED_FORCE_CUDA=1, but" in err
    missing = "CPU-only build" if torch.version.cuda is None else f"{tmp_path} has no bin/nvcc"
    assert missing in err


def test_build_info_matches_this_process():
    """The installed extension is the one this torch and this machine's
    toolkit call for, and has the kernels it says it has."""
    info = lstm_fused.build_info()
    assert set(info) == {"cuda", "reason", "cuda_version", "cuda_home", "cuda_archs", "torch",
                         "torch_cuda"}
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    for op in ("layer_forward", "layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"lstm_fused::{op}", "CUDA") == info["cuda"]
    if torch.version.cuda is None:
        assert not info["cuda"] and "CPU-only build" in info["reason"]
    if info["cuda"]:
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_archs"]
    elif info["reason"] != "LSTM_FUSED_FORCE_CPU=1":
        site = str(Path(torch.__file__).parents[1])
        now = cuda_detect.decide(torch.version.cuda, site_dirs=[site])
        assert not now.cuda, f"built CPU-only ({info['reason']}), but {now.reason}"
