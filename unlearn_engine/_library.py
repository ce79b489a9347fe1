"""Loads the native extension; its import registers the torch.ops.unlearn_engine operators."""
import torch  # noqa: F401  (the extension links against torch; load it first)

try:
    from unlearn_engine import _C
except ImportError as err:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "unlearn_engine._C is not built. Run `make test` (or `pip install --no-build-isolation -e .`) "
        f"from the repository root. Original error: {err}"
    ) from err

ops = torch.ops.unlearn_engine


def build_info() -> dict:
    """How the extension was built: version, cuda (bool), cuda_version, cuda_arch_list, openmp."""
    return dict(_C.build_info())
