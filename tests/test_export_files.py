"""The files of an export: placement (never clobbering without --overwrite, the output checks)
and the sidecar contract (hashed fields; an edited sidecar is refused by the runtime)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from edgeseg.errors import EdgesegError, ExportError


def test_export_placement_never_clobbers_without_overwrite(tmp_path):
    from edgeseg.mobile.placement import place

    out = tmp_path / "x.pte"
    tmp = tmp_path / ".x.pte.1.partial"
    tmp.write_bytes(b"new")
    place(tmp, out, overwrite=False)
    assert out.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    with pytest.raises(ExportError, match="appeared during the export"):  # someone wrote x.pte meanwhile
        place(tmp, out, overwrite=False)
    assert out.read_bytes() == b"new"
    place(tmp, out, overwrite=True)
    assert out.read_bytes() == b"newer" and not tmp.exists()


def test_export_output_checks(tmp_path):
    from edgeseg.mobile.placement import check_output

    check_output(tmp_path / "a.pte", ".pte", overwrite=False)
    with pytest.raises(ExportError, match="must end in .pte"):
        check_output(tmp_path / "a.bin", ".pte", overwrite=True)
    (tmp_path / "dir.mlpackage").mkdir()
    check_output(tmp_path / "dir.mlpackage", ".mlpackage", overwrite=True)  # a package is a folder
    with pytest.raises(ExportError, match="exists"):
        check_output(tmp_path / "dir.mlpackage", ".mlpackage", overwrite=False)
    os.mkfifo(tmp_path / "p.pte")
    with pytest.raises(ExportError, match="not a regular file"):
        check_output(tmp_path / "p.pte", ".pte", overwrite=True)


@pytest.fixture
def fake_export(tmp_path):
    from edgeseg.mobile.sidecar import student_sidecar, write_sidecar
    from edgeseg.models import PRESETS

    out = tmp_path / "m.pte"
    out.write_bytes(b"not really a program")
    meta = student_sidecar(SimpleNamespace(preset=PRESETS["tiny-student"]), "executorch", out, 1, 3, 1, "none",
                           None, "synthetic")
    write_sidecar(out, meta)
    return out


def test_sidecar_contract_fields_are_hashed(fake_export):
    from edgeseg.mobile import sidecar as sc

    meta = sc.read_sidecar(fake_export)
    assert meta["contract_sha256"] == sc.contract_digest(meta)
    sc.check_contract(meta, fake_export)


@pytest.mark.parametrize("edit", [{"threshold": 0.5}, {"image_size": [128, 128]}, {"ensemble": 9},
                                  {"preprocessing": {"scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}}])
def test_an_edited_sidecar_is_refused(fake_export, edit):
    from edgeseg.mobile import sidecar as sc
    from edgeseg.mobile.runtime import PteSegmenter

    side = sc.sidecar_path(fake_export)
    meta = json.loads(side.read_text())
    meta.update(edit)
    side.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="contract"):
        PteSegmenter(fake_export)


def test_unverified_sidecar_is_still_type_checked_and_a_bad_program_is_one_error(fake_export):
    from edgeseg.mobile import sidecar as sc
    from edgeseg.mobile.runtime import PteSegmenter

    with pytest.raises(EdgesegError, match="not a loadable ExecuTorch program"):
        PteSegmenter(fake_export)
    side = sc.sidecar_path(fake_export)
    meta = json.loads(side.read_text())
    meta["image_size"] = "64x64"
    side.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="image_size"):
        PteSegmenter(fake_export, verify=False)
