"""How mada-fused's extensions are compiled; setup.py only declares them.

Always builds ``mada_fused._C_cpu`` (g++, OpenMP, -O3); also builds
``mada_fused._C_cuda`` from csrc/cuda/*.cu and *.cpp when nvcc is found.
Neither links libtorch or libc10 (they take raw addresses, csrc/abi.h), and the
CUDA one links the static CUDA runtime, so one wheel serves every torch version
and imports on machines without a GPU or driver. Nothing here imports torch.

All objects of all extensions go into one build.ninja, so .cu and .cpp files
compile in parallel, and ninja's depfiles rebuild an object when any header it
includes changes (csrc/abi.h, csrc/mada_math.h, ...); without ninja every
object compiles, one by one.

Environment:
  MADA_CUDA_ARCHS   GPU targets, e.g. "80;86;89;90+PTX" (default; "+PTX" adds
                    PTX for newer GPUs), "8.0 9.0", "sm_90a"
  MADA_BUILD_CUDA   "auto" (default), "0" (never), "1" (fail without nvcc)
                    auto builds _C_cuda with CUDA 12.1 or newer and only for
                    targets nvcc lists (--list-gpu-code); otherwise it skips
                    _C_cuda and says why, where "1" stops the build
  MADA_BUILD_CUDA_ON_CPU  "1": also ``mada_fused._C_cuda_on_cpu``, the same
                    csrc/cuda sources compiled by the host compiler through
                    csrc/cuda/cuda_on_cpu.h (backend "cuda_on_cpu", for tests)
  CUDA_HOME         toolkit root (else found from nvcc on PATH)
  MADA_SANITIZE     e.g. "address,undefined": instrument the CPU extension with
                    these sanitizers (.ci/sanitize_cpu.sh), objects in a build
                    folder of their own
  MADA_OBJECTS      a folder for the objects that outlives the build (default: the build's
                    temporary one): scripts/setup_env.sh and .ci/wheel_smoke.sh share one, so
                    the wheel, built in pip's isolated env, links the CPU kernel objects the
                    editable install compiled (ninja rebuilds any whose command or headers changed)
  MAX_JOBS          parallel compile jobs; CXX, MADA_NVCC_FLAGS as usual
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "80;86;89;90+PTX"
CXX = os.environ.get("CXX", "g++")
# -ffp-contract=off: no FMA contraction, so every instruction set (and the
# reference, which rounds after each op) sees the same rounding;
# -fno-math-errno lets sqrt vectorise; -fno-trapping-math lets the
# vectoriser if-convert. None of them changes a result. No vectorised loop
# epilogues: blocks are 64 elements, only segment tails run the scalar loop,
# and the epilogues cost 15% of the compile time.
CPU_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno",
             "-fno-trapping-math", "-ffp-contract=off", "--param=vect-epilogues-nomask=0",
             "-DNDEBUG", "-Wall"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# Parameter dtypes of the CPU kernel objects, as abi.h's Dtype enumerators (the codes live there only).
CPU_DTYPES = {"f32": "kF32", "f64": "kF64", "bf16": "kBF16", "f16": "kF16"}
# (isa, flags, dtypes): one kernel object per entry; float64 (the test
# oracle's dtype) only in the portable one. Keep in sync with binding.cpp.
# On x86 the portable objects only serve pre-AVX2 CPUs and float64: -O2
# halves their compile time (the same results: no fast-math either way).
CPU_ISAS = [("base", ["-O2"] if X86 else [], ("f32", "f64", "bf16", "f16"))]


def cxx_accepts(flags: list[str]) -> bool:
    """Whether $CXX compiles an empty file with ``flags`` (for flags newer compilers add)."""
    try:
        return subprocess.run([CXX, *flags, "-x", "c++", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True).returncode == 0
    except OSError:
        return False


if X86:
    # Inline copies (the tangent rows) in 32-byte moves, not 16 (g++ >= 12; 2-6 % on full MADA).
    WIDE_MOVES = ["-mmove-max=256", "-mstore-max=256"]
    CPU_ISAS.append(("avx2", ["-mavx2", *(WIDE_MOVES if cxx_accepts(WIDE_MOVES) else [])], ("f32", "bf16", "f16")))


def sanitize_flags() -> list[str]:
    """Compile and link flags of MADA_SANITIZE (none when unset). Every finding is fatal:
    a sanitizer report that only prints would pass CI."""
    spec = os.environ.get("MADA_SANITIZE", "").strip()
    if not spec:
        return []
    if not re.fullmatch(r"[a-z]+(,[a-z]+)*", spec):
        raise SystemExit(f"mada-fused: MADA_SANITIZE={spec!r} is not a comma list of sanitizers")
    # -O0 -g1 (after the usual -O3, so they win): every access stays instrumented, line tables
    # are all a report needs, and a kernel object compiles in 8 s of CPU against 64 s with
    # -O3 -g (25 s at -O1): the CI job's cost.
    return [f"-fsanitize={spec}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-O0", "-g1"]


def note(msg: str) -> None:
    print(f"mada-fused: {msg}", flush=True)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def headers() -> list[str]:
    """Every header the extensions include (setuptools' ``depends``): a change rebuilds them."""
    return sorted(rel(p) for ext in ("h", "inc", "cuh") for p in glob.glob(os.path.join(CSRC, "**", f"*.{ext}"),
                                                                           recursive=True))


# -- CUDA toolkit and arch list ------------------------------------------------------------
def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """"80;86;90+PTX" -> [("80", False), ("86", False), ("90", True)]; accepts 8.0, sm_80, 90a."""
    out = []
    for item in filter(None, re.split(r"[;,\s]+", spec.strip())):
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+ptx)?", item, re.IGNORECASE)
        if not m:
            raise SystemExit(f"mada-fused: cannot read CUDA arch {item!r} in MADA_CUDA_ARCHS={spec!r}")
        num = m.group(1) + (m.group(2) or "") + m.group(3).lower()
        out.append((num, m.group(4) is not None))
    if not out:
        raise SystemExit("mada-fused: MADA_CUDA_ARCHS is empty")
    return out


def arch_names(archs: list[tuple[str, bool]]) -> list[str]:
    """What the fatbinary holds: sm_XX (SASS) and compute_XX (PTX) entries."""
    names = []
    for num, ptx in archs:
        names.append(f"sm_{num}")
        if ptx:
            names.append(f"compute_{num}")
    return names


# Kernel parameters over 4 KB (the segment table travels by value, csrc/cuda/launch.h) need CUDA 12.1.
MIN_CUDA = (12, 1)
# Oldest SASS target each toolkit major version still compiles, for when nvcc's own list
# (--list-gpu-code) cannot be read: CUDA 12 dropped sm_35/sm_37, CUDA 13 Maxwell, Pascal and
# Volta (sm_50 to sm_72).
OLDEST_ARCH = {11: 35, 12: 50, 13: 75}


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("... release 13.0, V13.0.88"); None if absent."""
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_gpu_targets(text: str) -> set[int]:
    """Arch numbers of ``nvcc --list-gpu-code`` / ``--list-gpu-arch`` ("sm_75 sm_80 ...") -> {75, 80}."""
    return {int(n) for n in re.findall(r"\b(?:sm|compute|lto)_(\d+)[af]?\b", text)}


def toolkit_refusal(version: tuple[int, int] | None, archs: list[tuple[str, bool]],
                    targets: set[int] | None) -> str:
    """Why this toolkit cannot build these archs ("" when it can). ``targets``: what nvcc lists
    (None: it cannot list, so OLDEST_ARCH decides)."""
    if version is None:
        return "cannot read the CUDA version from `nvcc --version`"
    have = f"CUDA {version[0]}.{version[1]}"
    if version < MIN_CUDA:
        return (f"nvcc is {have}; mada-fused needs CUDA {MIN_CUDA[0]}.{MIN_CUDA[1]} or newer "
                "(its kernel arguments are over 4 KB, which CUDA 12.1 allows)")
    oldest = OLDEST_ARCH[min(max(OLDEST_ARCH), version[0])]
    for num, _ in archs:
        base = int(re.match(r"\d+", num).group())
        if base not in targets if targets is not None else base < oldest:
            can = (", ".join(f"sm_{t}" for t in sorted(targets)) if targets is not None
                   else f"sm_{oldest} and newer")
            return (f"MADA_CUDA_ARCHS asks for sm_{num}, which {have} cannot compile for (it has {can}); "
                    f"set MADA_CUDA_ARCHS to targets it supports, e.g. {DEFAULT_CUDA_ARCHS!r}")
    return ""


def check_toolkit(nvcc: str, archs: list[tuple[str, bool]]) -> str:
    """Asks ``nvcc`` its version and GPU targets; why it cannot build ``archs`` ("" when it can)."""
    def ask(flag: str) -> str | None:
        try:
            out = subprocess.run([nvcc, flag], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    targets = parse_gpu_targets((ask("--list-gpu-code") or "") + (ask("--list-gpu-arch") or ""))
    return toolkit_refusal(parse_nvcc_version(ask("--version") or ""), archs, targets or None)


def _has_runtime(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda() -> tuple[dict | None, str]:
    """({nvcc, home, cudart_dir}, "") or (None, reason)."""
    mode = os.environ.get("MADA_BUILD_CUDA", "auto").lower()
    if mode in ("0", "no", "off", "false"):
        return None, "MADA_BUILD_CUDA=0"
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = next((os.path.join(h, "bin", "nvcc") for h in homes if h and os.path.isfile(os.path.join(h, "bin", "nvcc"))), None)
    nvcc = nvcc or shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda/bin/nvcc")), None)
    if not nvcc:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where it lives.
    homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        here = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        if here:
            homes.append(os.path.dirname(here.group(1)))
    except (OSError, subprocess.SubprocessError):
        pass
    home = next((h for h in homes if _has_runtime(h)), None)
    if home is None:
        return None, f"found {nvcc} but no CUDA toolkit headers next to it (set CUDA_HOME)"
    libdirs = [os.path.join(home, d) for d in ("lib64", "lib")] + glob.glob(os.path.join(home, "targets", "*", "lib"))
    cudart = next((d for d in libdirs if os.path.isfile(os.path.join(d, "libcudart_static.a"))), None)
    if cudart is None:
        return None, f"no libcudart_static.a under {home}"
    return {"nvcc": nvcc, "home": home, "cudart_dir": cudart}, ""


@dataclass
class CudaPlan:
    """What this build does about CUDA: the toolkit (None: no CUDA extension) and why not."""

    toolkit: dict | None
    reason: str = ""
    sources: list[str] = field(default_factory=list)
    archs: list[tuple[str, bool]] = field(default_factory=list)

    def status(self) -> str:
        """One line for build_info (compiled into the CPU extension)."""
        if self.toolkit:
            return f"built for {';'.join(arch_names(self.archs))} with {self.toolkit['nvcc']}"
        return f"not built: {self.reason}"


def cuda_sources() -> list[str]:
    """csrc/cuda/*.cu and *.cpp, relative to the root."""
    return sorted(rel(p) for ext in ("cu", "cpp") for p in glob.glob(os.path.join(CSRC, "cuda", f"*.{ext}")))


def cuda_plan() -> CudaPlan:
    cuda, reason = find_cuda()
    sources = cuda_sources()
    if cuda and not sources:
        cuda, reason = None, "no sources in csrc/cuda/"
    archs = parse_archs(os.environ.get("MADA_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS) if cuda else []
    if cuda:
        reason = check_toolkit(cuda["nvcc"], archs)
        if reason:
            cuda, archs = None, []
    if os.environ.get("MADA_BUILD_CUDA", "").lower() in ("1", "yes", "on", "true") and not cuda:
        raise SystemExit(f"mada-fused: MADA_BUILD_CUDA=1 but {reason}")
    return CudaPlan(cuda, reason, sources if cuda else [], archs)


# -- ninja ------------------------------------------------------------------------------
def _esc(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_if_changed(path: str, text: str) -> None:
    """Generated sources keep their mtime when unchanged, so ninja does not rebuild them."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _cstr(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Job:
    """One compile (or link) step: a command writing ``out`` from ``ins``; ``dep``: it writes a depfile."""

    out: str
    ins: list[str]
    argv: list[str]
    kind: str
    dep: bool = True


def run_jobs(jobs: list[Job], build_dir: str) -> None:
    """Runs the jobs in order-respecting parallel with ninja, else sequentially."""
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg  # the PyPI wheel: the build requirement

            ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
        except ImportError:
            ninja = None
    if ninja is None:
        note("ninja not found: compiling one file at a time")
        for job in jobs:
            subprocess.check_call(job.argv)
        return
    lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc",
             "rule dep", "  command = $cmd", "  description = $desc", "  depfile = $out.d", "  deps = gcc"]
    for job in jobs:
        lines.append(f"build {_esc(job.out)}: {'dep' if job.dep else 'run'} {' '.join(map(_esc, job.ins))}")
        lines.append("  cmd = " + " ".join(shlex.quote(a) for a in job.argv).replace("$", "$$"))
        lines.append(f"  desc = {job.kind} {rel(job.out)}")
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "build.ninja"), "w") as f:
        f.write("\n".join(lines) + "\n")
    cmd = [ninja, "-C", build_dir]
    if os.environ.get("MAX_JOBS"):
        cmd += ["-j", os.environ["MAX_JOBS"]]
    subprocess.check_call(cmd)


# -- the jobs of each extension ---------------------------------------------------------------
def cpu_jobs(tmp: str, includes: list[str], out: str, cuda_status: str) -> list[Job]:
    """One kernel object per (ISA, dtype), the binding, the link."""
    flags = CPU_FLAGS + sanitize_flags()
    write_if_changed(os.path.join(tmp, "cpu_build_config.h"),
                     f"#define MADA_CPU_FLAGS {_cstr(' '.join(flags))}\n"
                     f"#define MADA_CUDA_STATUS {_cstr(cuda_status)}\n")
    src = os.path.join(CSRC, "cpu")
    jobs, objs = [], []
    # A sanitized build checks memory and UB, which the source decides, not the ISA: the
    # portable objects alone (the AVX2 ones are the same kernels.cpp) keep the CI job short.
    isas = CPU_ISAS[:1] if sanitize_flags() else CPU_ISAS
    # kernels.cpp includes csrc/ only: without the build env's pybind11 and Python paths its
    # command is the same in every build, so a shared MADA_OBJECTS folder reuses its objects.
    csrc_only = ["-I" + CSRC]
    for isa, isa_flags, dtypes in isas:
        for dt in dtypes:
            obj = os.path.join(tmp, f"kernels_{isa}_{dt}.o")
            defs = [f"-DMADA_PARAM_CODE={CPU_DTYPES[dt]}", f"-DMADA_TABLE=kernels_{isa}_{dt}"]
            argv = [CXX, *flags, *isa_flags, *defs, *csrc_only, "-MMD", "-MF", obj + ".d",
                    "-c", os.path.join(src, "kernels.cpp"), "-o", obj]
            jobs.append(Job(obj, [os.path.join(src, "kernels.cpp")], argv, f"CXX[{isa}]"))
            objs.append(obj)
    obj = os.path.join(tmp, "cpu_binding.o")
    avx2 = ["-DMADA_HAVE_AVX2"] if len(isas) > 1 else []
    argv = [CXX, *flags, *avx2, *includes, "-MMD", "-MF", obj + ".d", "-c",
            os.path.join(src, "binding.cpp"), "-o", obj]
    jobs.append(Job(obj, [os.path.join(src, "binding.cpp")], argv, "CXX"))
    objs.append(obj)
    link = [CXX, "-shared", "-fopenmp", *sanitize_flags(), *objs, "-o", out]
    return jobs + [Job(out, objs, link, "LINK", dep=False)]


def cuda_jobs(tmp: str, includes: list[str], out: str, plan: CudaPlan) -> list[Job]:
    """Every .cu (nvcc) and .cpp (host compiler) of csrc/cuda/, the arch list, the link."""
    cuda, names = plan.toolkit, arch_names(plan.archs)
    # The arch list travels inside the .so: backends/cuda.py reads it with ctypes.
    gen = os.path.join(tmp, "cuda_archs.cpp")
    write_if_changed(gen, 'extern "C" __attribute__((visibility("default"))) const char* '
                          f"mada_fused_cuda_archs() {{ return {_cstr(';'.join(names))}; }}\n")
    cuda_inc = "-I" + os.path.join(cuda["home"], "include")
    host = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-Wall"]
    gencode = []
    for num, ptx in plan.archs:
        gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            gencode.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    # No --use_fast_math: the kernels must match the reference to 1e-6.
    nvcc_flags = ["-O3", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                  *gencode, *shlex.split(os.environ.get("MADA_NVCC_FLAGS", ""))]
    if "CXX" in os.environ:
        nvcc_flags += ["-ccbin", CXX]
    jobs, objs = [], []
    for src in [os.path.join(ROOT, s) for s in plan.sources] + [gen]:
        stem = os.path.splitext(os.path.basename(src))[0]
        obj = os.path.join(tmp, f"cuda_{stem}{'_cu' if src.endswith('.cu') else ''}.o")
        if src.endswith(".cu"):
            argv = [cuda["nvcc"], *nvcc_flags, *includes, "-MD", "-MF", obj + ".d", "-c", src, "-o", obj]
            kind = "NVCC"
        else:
            argv = [CXX, *host, *includes, cuda_inc, "-MMD", "-MF", obj + ".d", "-c", src, "-o", obj]
            kind = "CXX"
        jobs.append(Job(obj, [src], argv, kind))
        objs.append(obj)
    # Static cudart, its symbols kept private (--exclude-libs) so they never
    # bind to another CUDA runtime in the process (torch's libcudart.so).
    link = [CXX, "-shared", *objs, "-o", out, "-L" + cuda["cudart_dir"], "-l:libcudart_static.a",
            "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic"]
    return jobs + [Job(out, objs, link, "LINK", dep=False)]


def cuda_on_cpu_wanted() -> bool:
    return os.environ.get("MADA_BUILD_CUDA_ON_CPU", "").lower() in ("1", "yes", "on", "true")


def cuda_on_cpu_jobs(tmp: str, includes: list[str], out: str, sources: list[str]) -> list[Job]:
    """csrc/cuda/ compiled as C++: each block's threads run as host threads (cuda_on_cpu.h)."""
    flags = ["-O2", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-DMADA_CUDA_MODULE=_C_cuda_on_cpu"]
    jobs, objs = [], []
    for src in [os.path.join(ROOT, s) for s in sources]:
        obj = os.path.join(tmp, f"cuda_on_cpu_{os.path.splitext(os.path.basename(src))[0]}.o")
        argv = [CXX, *flags, *includes, "-MMD", "-MF", obj + ".d", "-x", "c++", "-c", src, "-o", obj]
        jobs.append(Job(obj, [src], argv, "CXX[cuda_on_cpu]"))
        objs.append(obj)
    link = [CXX, "-shared", "-pthread", *objs, "-o", out]
    return jobs + [Job(out, objs, link, "LINK", dep=False)]


class BuildExt(build_ext):
    """Compiles every extension through :func:`run_jobs`; setup.py sets ``cuda`` (a :class:`CudaPlan`)."""

    cuda: CudaPlan = CudaPlan(None, "not planned")

    def run(self) -> None:
        # setuptools clears `inplace` while building and copies to the tree after.
        self._to_source_tree = self.inplace or getattr(self, "editable_mode", False)
        super().run()

    def build_extensions(self) -> None:
        import sysconfig

        import pybind11  # build requirement

        # Sanitized objects never mix with the normal ones.
        folder = "mada_fused-sanitize" if sanitize_flags() else "mada_fused"
        tmp = os.path.abspath(os.path.join(os.environ.get("MADA_OBJECTS") or self.build_temp, folder))
        os.makedirs(tmp, exist_ok=True)
        includes = ["-I" + CSRC, "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"],
                    "-I" + tmp]
        self._drop_stale_cuda()
        if self.cuda.toolkit:
            note(f"building the CUDA extension for {', '.join(arch_names(self.cuda.archs))} "
                 f"with {self.cuda.toolkit['nvcc']}")
        else:
            note(f"building without the CUDA extension: {self.cuda.reason}")
        jobs: list[Job] = []
        for ext in self.extensions:
            out = os.path.abspath(self.get_ext_fullpath(ext.name))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if ext.name.endswith("_C_cpu"):
                jobs += cpu_jobs(tmp, includes, out, self.cuda.status())
            elif ext.name.endswith("_C_cuda_on_cpu"):
                jobs += cuda_on_cpu_jobs(tmp, includes, out, ext.sources)
            else:
                jobs += cuda_jobs(tmp, includes, out, self.cuda)
        run_jobs(jobs, tmp)

    def _drop_stale_cuda(self) -> None:
        """Without a CUDA build this time, an old _C_cuda (in build/lib, or in the
        source tree from an editable install) was built from other sources: the
        wheel must not ship it and imports must not find it."""
        if self.cuda.toolkit:
            return
        old = [self.get_ext_fullpath("mada_fused._C_cuda")]
        if getattr(self, "_to_source_tree", False):
            old += glob.glob(os.path.join(ROOT, "mada_fused", "_C_cuda*"))
        for path in filter(os.path.exists, old):
            note(f"removing {rel(path)}: not rebuilt in this build")
            os.remove(path)
