"""Which extension setup.py builds: CUDA, with a complete toolkit of torch's
CUDA major version, or else CPU-only, with the reason why.

Plain Python without torch: setup.py imports it before anything is built,
and tests/test_build.py runs it on fake toolkits.

The toolkit: $CUDA_HOME (or $CUDA_PATH) when set; else the one behind the
`nvcc` on PATH (nvcc's own `-dryrun` output names its folder, so wrapper
scripts and links do not matter; where it says nothing, its resolved and
literal parent folders); then /usr/local/cuda. The first that passes check() wins.
"""
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_HOME = "/usr/local/cuda"
# The toolkit's own headers, and those ATen/cuda/CUDAContextLight.h includes
# from the CUDA libraries, which may come from torch's nvidia-* wheels instead.
TOOLKIT_HEADERS = ("cuda_runtime_api.h", "crt/host_defines.h")
LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


class ForcedCudaError(RuntimeError):
    """LSTM_FUSED_FORCE_CUDA=1 where the CUDA extension cannot be built."""


@dataclass
class Decision:
    cuda: bool
    reason: str
    cuda_home: Optional[str] = None
    cuda_version: Optional[str] = None      # nvcc's "X.Y"
    include_dirs: List[str] = field(default_factory=list)  # toolkit's first

    def line(self):
        """The one line setup.py prints."""
        kind = "CUDA" if self.cuda else "CPU-only"
        return f"lstm_fused: building the {kind} extension: {self.reason}"


def flag(env, name):
    return env.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _run(cmd):
    """stdout + stderr of cmd, or "" when it cannot run."""
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return p.stdout + p.stderr


def nvcc_release(nvcc):
    """"X.Y" from `nvcc --version`, or None."""
    m = re.search(r"release (\d+)\.(\d+)", _run([nvcc, "--version"]))
    return f"{m[1]}.{m[2]}" if m else None


def nvcc_top(nvcc):
    """The toolkit folder nvcc reports for itself (TOP, else _HERE_/..):
    right even when `nvcc` is a wrapper script that execs the real one."""
    out = _run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull])
    for key, up in (("TOP", ""), ("_HERE_", "..")):
        m = re.search(rf"^#\$ {key}=(.+?)\s*$", out, re.M)
        if m:
            return os.path.normpath(os.path.join(m[1], up))
    return None


def homes_of(nvcc):
    """Toolkit folders to try for this nvcc: the one it reports, else the
    parent of its bin/ with links resolved, then as found."""
    top = nvcc_top(nvcc)
    if top:
        return [top]
    real, found = (os.path.dirname(os.path.dirname(p(nvcc)))
                   for p in (os.path.realpath, os.path.abspath))
    return [real] if real == found else [real, found]


def candidates(env, default_home=DEFAULT_HOME):
    """(folder, how it was found) pairs, in order of preference."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        name = "CUDA_HOME" if env.get("CUDA_HOME") else "CUDA_PATH"
        return [(home, f"${name}")]
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    found = [(h, f"nvcc at {nvcc}") for h in homes_of(nvcc)] if nvcc else []
    if os.path.isdir(default_home) and all(os.path.realpath(default_home) != os.path.realpath(h)
                                           for h, _ in found):
        found.append((default_home, "the default location"))
    return found


def wheel_header_dirs(site_dirs):
    return sorted(d for s in site_dirs
                  for d in glob.glob(os.path.join(s, "nvidia", "*", "include")))


def check(home, torch_cuda, site_dirs):
    """(problem, nvcc version, include dirs) for the toolkit at home;
    problem is None when it can build the CUDA extension."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"{home} has no bin/nvcc", None, []
    inc = os.path.join(home, "include")
    for h in TOOLKIT_HEADERS:
        if not os.path.isfile(os.path.join(inc, h)):
            return f"{home} lacks include/{h}, not a complete CUDA toolkit", None, []
    version = nvcc_release(nvcc)
    if version is None:
        return f"{nvcc} --version names no release", None, []
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc {version} at {home} does not match torch's CUDA {torch_cuda} "
                "(the major versions differ)"), version, []
    # gcc refuses /usr/include as -I (Debian's toolkit): it is searched anyway.
    dirs = [] if os.path.realpath(inc) == "/usr/include" else [inc]
    wheels = wheel_header_dirs(site_dirs)
    for h in LIBRARY_HEADERS:
        if os.path.isfile(os.path.join(inc, h)):
            continue
        src = next((d for d in wheels if os.path.isfile(os.path.join(d, h))), None)
        if src is None:
            return f"no {h} in {inc} nor in torch's nvidia-* wheels", version, []
        if src not in dirs:
            dirs.append(src)
    return None, version, dirs


def decide(torch_cuda, env=None, site_dirs=(), default_home=DEFAULT_HOME):
    """The Decision for a torch whose torch.version.cuda is torch_cuda (None:
    CPU-only torch). env: the environment (default os.environ); site_dirs:
    folders holding torch's nvidia-* wheels; default_home: the toolkit to try
    when none is named or on PATH. Raises ForcedCudaError where
    LSTM_FUSED_FORCE_CUDA=1 but the CUDA extension cannot be built."""
    env = os.environ if env is None else env
    if flag(env, "LSTM_FUSED_FORCE_CPU"):
        return Decision(False, "LSTM_FUSED_FORCE_CPU=1")
    problems = []
    if torch_cuda is None:
        problems.append("this torch is a CPU-only build (torch.version.cuda is None)")
    else:
        found = candidates(env, default_home)
        if not found:
            problems.append(f"no CUDA toolkit (no nvcc on PATH, CUDA_HOME unset, nothing at "
                            f"{default_home})")
        for home, how in found:
            problem, version, dirs = check(home, torch_cuda, site_dirs)
            if problem is None:
                return Decision(True, f"CUDA {version} toolkit at {home} (from {how})",
                                home, version, dirs)
            problems.append(f"{how}: {problem}")
    reason = "; ".join(problems)
    if flag(env, "LSTM_FUSED_FORCE_CUDA"):
        raise ForcedCudaError(f"LSTM_FUSED_FORCE_CUDA=1, but {reason}")
    return Decision(False, reason)
