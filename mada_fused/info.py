"""``python -m mada_fused.info``: how this installation was built and what runs here.

``--json`` prints :func:`mada_fused.build_info` as JSON instead.
"""
from __future__ import annotations

import json
import sys

from .backends.cuda import cuda_version
from .build_info import build_info


def _lines(info: dict) -> list[str]:
    yes = {True: "yes", False: "no"}
    out = [f"mada-fused {info['version']} (torch {info['torch']})"]
    if info["cpu_ext"]:
        cpu = info["cpu"]
        out.append(f"CPU extension:  yes ({cpu['isa']} kernels, {cpu['threads']} threads, {cpu['compiler']}, "
                   f"OpenMP {cpu['openmp']})")
    else:
        out.append(f"CPU extension:  no ({info['cpu_ext_error']})")
    if info["cuda_ext"]:
        driver = f"CUDA {cuda_version(info['cuda_driver'])}" if info["cuda_driver"] else "none found"
        out.append(f"CUDA extension: yes, code for {', '.join(info['cuda_archs']) or 'unknown archs'}; "
                   f"built with CUDA {cuda_version(info['cuda_runtime'])} (static runtime); driver: {driver}")
        if info["cuda_driver_problem"]:
            out.append(f"  WARNING: {info['cuda_driver_problem']}")
    else:
        out.append(f"CUDA extension: no ({info['cuda_build']})")
    for g in info["gpus"]:
        code = yes[g["cuda_ext_has_code"]] if info["cuda_ext"] else "n/a"
        out.append(f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}); "
                   f"CUDA extension has code for it: {code}")
    if not info["gpus"]:
        out.append("GPU: none visible to torch")
    out.append(f"Triton:         {yes[info['triton']]}")
    out.append(f"Backends here:  {', '.join(info['backends_available'])}")
    for name, why in sorted(info["unavailable"].items()):
        out.append(f"  {name}: unavailable ({why})")
    for device, name in info["auto"].items():
        out.append(f"backend='auto' on {device}: {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = build_info()
    if "--json" in argv:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(_lines(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
