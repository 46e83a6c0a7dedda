"""The command line: clear errors with a non-zero exit and no traceback."""
import subprocess
import sys

import torch
import yaml

from lorafind_utils.app.cli import main


def test_lora_check_ok(tiny_cfg, catalog, tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["lora", "check", catalog[4]["path"], "--profile", str(prof)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "kohya-locon" in out and "text-encoder modules" in out


def test_lora_check_refuses_pickle_without_traceback(tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"a": 1}, p)
    r = subprocess.run(
        [sys.executable, "-m", "lorafind_utils.app.cli", "lora", "check", str(p)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "pickle" in r.stderr and "Traceback" not in r.stderr


def test_unknown_profile(capsys):
    assert main(["study", "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
