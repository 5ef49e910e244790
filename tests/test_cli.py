"""swp_plugin.cli: errors that name the file and say what to do (the checks of the files themselves are in
tests/test_persistence.py, the output and progress cases in tests/test_reliability.py)."""

from __future__ import annotations

import pytest
import torch

import swp_plugin
from swp_plugin import cli
from swp_plugin.models import create_model


def _exit(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_out_of_memory_gets_a_hint(monkeypatch, tmp_path, capsys):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cli, "create_model", no_memory)
    err = _exit(capsys, ["prune", "resnet20", "--macs-reduction", "0.3", "--out", str(tmp_path / "o.pt")])
    assert "out of memory" in err and "smaller --input-size" in err


def test_report_names_the_file_of_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert f"{tmp_path / 'empty.pt'}: is empty" in _exit(capsys, ["report", str(tmp_path / "empty.pt")])
    swp_plugin.save(create_model("resnet20"), tmp_path / "anonymous.pt")
    assert "metadata['architecture']: missing" in _exit(capsys, ["report", str(tmp_path / "anonymous.pt")])


def test_prune_checkpoint_that_is_not_a_state_dict(tmp_path, capsys):
    torch.save({"weights": [1, 2]}, tmp_path / "ck.pt")
    err = _exit(capsys, ["prune", "resnet20", "--macs-reduction", "0.3", "--num-classes", "10", "--checkpoint",
                         str(tmp_path / "ck.pt"), "--out", str(tmp_path / "o.pt")])
    assert f"{tmp_path / 'ck.pt'}: not a state_dict" in err
