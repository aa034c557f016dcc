"""`obsdiff-export onnx --json`: stdout is the export record alone."""

import json

from click.testing import CliRunner

from obsdiff.export.cli import cli


def test_onnx_json_prints_the_record(tiny_sd3_dir, tmp_path):
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["onnx", str(tiny_sd3_dir), "--out", str(out), "--exporter", "legacy", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    component = record["components"]["transformer"]
    assert (out / component["file"]).is_file()
    assert component["checks"]["parity"] == "passed"
