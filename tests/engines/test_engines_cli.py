from click.testing import CliRunner
from obsdiff.export.cli import cli


def test_engine_and_bench_commands_exist_and_fail_clearly(tmp_path):
    runner = CliRunner()
    assert "--sparse-weights" in runner.invoke(cli, ["build-engine", "--help"]).output
    assert "torch-sparse24" in "".join(runner.invoke(cli, ["bench", "--help"]).output.split())
    r = runner.invoke(cli, ["build-engine", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "m.plan")])
    assert r.exit_code == 2 and "not implemented yet" in r.output
    r = runner.invoke(cli, ["bench", "builtin:digits"])
    assert r.exit_code == 2 and "not implemented yet" in r.output
