import subprocess
import sys


def test_core_import_is_light():
    """`import obsdiff.cli` must not pull in the export stack or onnx (lazy optional imports)."""
    code = ("import sys, obsdiff.cli, obsdiff.eval.evaluate, obsdiff.runs.loading; "
            "heavy = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'polygraphy', 'matplotlib', "
            "'obsdiff.export', 'obsdiff.engines') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
