import pytest
from click.testing import CliRunner
from obsdiff.export.cli import cli


@pytest.mark.parametrize("command, option", [("onnx", "--linear-as-gemm"), ("triton", "--out")])
def test_export_commands_are_listed_with_options(command, option):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and option in r.output


def test_onnx_export_not_implemented_yet(tmp_path):
    r = CliRunner().invoke(cli, ["onnx", "builtin:digits", "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "not implemented yet" in r.output
    assert not (tmp_path / "onnx").exists()
