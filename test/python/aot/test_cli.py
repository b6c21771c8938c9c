"""`lowbit compile`: argument errors are reported, not raised (the compile itself is covered by
the artifact tests through lowbit.aot.compile_preset, which the command calls)."""
from lowbit.cli import main


def test_existing_output_needs_force(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["compile", "--preset", "tiny", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err


def test_bad_config_field(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="lowbit compile: unknown config field .layers."):
        main(["compile", "--preset", "tiny", "-o", str(tmp_path / "x"), "--set", "layers=3"])
