"""lowbit's runtime: run an exported model (``lowbit.export_onnx``) on onnxruntime.

Needs onnxruntime, numpy and ``tokenizers`` only (never torch)::

    from lowbit.runtime import Session
    s = Session("out/")
    print(s.generate("Once upon a time", max_new_tokens=32).text)

The command line is ``lowbit run DIR --prompt ...`` (:func:`lowbit.runtime.cli.main`).
"""
from .manifest import FORMAT, FORMAT_VERSION, ManifestError, read_manifest

__all__ = ["Session", "Generation", "select_token", "pick_providers", "ManifestError", "read_manifest",
           "FORMAT", "FORMAT_VERSION", "main"]


def __getattr__(name):  # onnxruntime is imported on first use only
    if name in ("Session", "Generation", "select_token", "pick_providers"):
        from . import session

        return getattr(session, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
