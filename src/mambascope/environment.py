"""What this installation can do: versions, GPUs, slide libraries, scan backends, sample data."""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One line of the environment report."""

    name: str
    value: str
    ok: bool = True


def _version(module_name: str) -> str | None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception:  # a broken optional install is reported, not raised
        return None
    return str(getattr(module, "__version__", "installed"))


def environment_report() -> list[Fact]:
    """Collect the facts `mambascope doctor` prints."""
    import torch

    import mambascope
    from mambascope.sample_data import SAMPLE_DIR, check_samples
    from mambascope.ssm import available_backends

    facts = [
        Fact("mambascope", mambascope.__version__),
        Fact("python", f"{platform.python_version()} ({platform.machine()}, {platform.system()})"),
        Fact("torch", torch.__version__),
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        facts.append(Fact("cuda", f"{torch.version.cuda}; {torch.cuda.device_count()} GPU(s): {names}"))
    else:
        facts.append(Fact("cuda", f"not available (torch built for CUDA {torch.version.cuda}); CPU only"))
    triton = _version("triton")
    facts.append(Fact("triton", triton or "not installed", ok=triton is not None))
    try:
        import openslide

        facts.append(Fact("openslide", f"library {openslide.__library_version__}, "
                                       f"python bindings {openslide.__version__}"))
    except Exception as exc:  # OpenSlide missing is reported, other readers still work
        facts.append(Fact("openslide", f"unavailable ({exc})", ok=False))
    tiffslide = _version("tiffslide")
    facts.append(Fact("tiffslide", tiffslide or "not installed", ok=tiffslide is not None))
    backends = available_backends()
    facts.append(Fact("scan backends", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in backends.items())))
    samples = check_samples()
    found = sum(samples.values())
    missing = [name for name, ok in samples.items() if not ok]
    text = f"{found}/{len(samples)} files in {SAMPLE_DIR}"
    if missing:
        text += f"; missing or changed: {', '.join(missing)}"
    facts.append(Fact("sample data", text, ok=not missing))
    return facts
