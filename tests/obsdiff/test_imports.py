import subprocess
import sys


def test_core_import_is_light():
    """`import obsdiff.cli` must not pull in the export stack or onnx (lazy optional imports)."""
    code = ("import sys, obsdiff.cli, obsdiff.eval.evaluate, obsdiff.runs.loading; "
            "heavy = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'polygraphy', 'matplotlib', "
            "'obsdiff.export', 'obsdiff.engines') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_comes_from_the_module_that_defines_it():
    """`obsdiff.<name>` resolves, through the module the API table names, to that module's own definition."""
    import importlib

    import obsdiff

    for name, module in obsdiff._API.items():
        value = getattr(obsdiff, name)
        assert value is getattr(importlib.import_module(module), name)
        assert value.__module__ == module, f"obsdiff.{name} is defined in {value.__module__}, not {module}"
