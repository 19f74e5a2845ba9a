"""The demo's own pieces (the full demo runs through `make demo`): mixed-domain COCO splits,
pseudo-label quality per stage, overlays and the results table."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from resam_dist import demo
from resam_dist.config import load_config
from resam_dist.data.coco import CocoSplit
from resam_dist.demo import (DEMO_CONFIG, format_table, pretraining_key, pseudo_label_quality, target_kinds,
                             write_domain, write_overlays)
from resam_dist.model.build import build_sam
from resam_dist.train.pretrain import pretrain as real_pretrain


@pytest.fixture(scope="module")
def target_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("target")
    path = write_domain(out, {"buildings": 3, "sar_ships": 2}, size=96, seed=5)
    return CocoSplit(path, path.parent / "images")


def test_mixed_domain_has_unique_ids_and_one_category_per_kind(target_split):
    with open(target_split.annotation_file) as f:
        coco = json.load(f)
    image_ids = [image["id"] for image in coco["images"]]
    annotation_ids = [annotation["id"] for annotation in coco["annotations"]]
    assert len(set(image_ids)) == 5 and len(set(annotation_ids)) == len(annotation_ids)
    assert [c["name"] for c in coco["categories"]] == ["building", "ship"]
    kinds = {image["id"]: image["file_name"].split("_0")[0] for image in coco["images"]}
    for annotation in coco["annotations"]:
        expected = 1 if kinds[annotation["image_id"]] == "buildings" else 2
        assert annotation["category_id"] == expected
    assert len(target_split) == 5


def test_pseudo_label_quality_and_overlays(target_split, tmp_path):
    cfg = load_config(DEMO_CONFIG, {"kernels.enabled": False})
    model = build_sam("tiny", seed=0)
    quality = pseudo_label_quality(model, target_split, cfg=cfg, max_images=5)
    stages = ("point", "refined", "requery", "point_box", "gt_box")
    assert set(quality) == {f"{stage}{kind}" for stage in stages for kind in ("", "_buildings", "_sar_ships")}
    assert all(0.0 <= value <= 1.0 for value in quality.values())
    for stage in stages:  # 3 building and 2 ship images: the overall value is their image-weighted mean
        mixed = (3 * quality[f"{stage}_buildings"] + 2 * quality[f"{stage}_sar_ships"]) / 5
        assert quality[stage] == pytest.approx(mixed, abs=1e-9)
    written = write_overlays(tmp_path / "overlays", model, model, target_split, cfg, count=2)
    assert len(written) == 2
    assert write_overlays(tmp_path / "none", model, model, target_split, cfg, count=0) == []
    sheet = np.asarray(Image.open(written[0]))
    assert sheet.shape[1] == 5 * 96  # ground truth | direct | refined | requeried | adapted
    assert sheet.std() > 0


def test_table_shows_mean_and_spread():
    row = {key: (0.5, 0.02) for key in ("miou", "f1", "precision", "recall", "miou_buildings", "miou_sar_ships")}
    table = format_table({"direct": {**row, "n": 1}, "ReSAM (full)": {**row, "miou": (0.6, 0.01), "n": 3}})
    assert "60.00 ± 1.00" in table and "direct" in table


def test_pretraining_key_covers_the_whole_source_domain(tmp_path):
    # Two source domains that differ only after their first 2 KB of annotations (one instance's
    # segmentation at the end), or only in one image's pixels, must not share a cached model; the
    # same files and settings must.
    import shutil

    first = write_domain(tmp_path / "a", {"sparse_buildings": 3}, size=64, seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = tmp_path / "b" / "annotations.json"
    coco = json.loads(second.read_text())
    coco["annotations"][-1]["area"] += 1
    second.write_text(json.dumps(coco))
    assert first.read_bytes()[:2048] == second.read_bytes()[:2048]
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    repainted = tmp_path / "c" / "images" / coco["images"][-1]["file_name"]
    pixels = np.asarray(Image.open(repainted)).copy()
    pixels[0, 0] ^= 1  # the appearance changes, the geometry does not
    Image.fromarray(pixels).save(repainted)
    key = pretraining_key(first, steps=10, images_per_step=4, lr=1e-3)
    assert key == pretraining_key(first, steps=10, images_per_step=4, lr=1e-3) and len(key) == 12
    assert key != pretraining_key(second, steps=10, images_per_step=4, lr=1e-3)
    assert key != pretraining_key(tmp_path / "c" / "annotations.json", steps=10, images_per_step=4, lr=1e-3)
    assert key != pretraining_key(first, steps=11, images_per_step=4, lr=1e-3)


def test_a_split_cut_short_is_written_again(tmp_path, monkeypatch):
    """annotations.json marks a finished split: a writer stopped after the first of two kinds
    leaves none, and the next call writes both kinds."""
    from resam_dist.data import synthetic

    real_write = synthetic.write_synthetic_coco

    def stopped_at_ships(out_dir, kind, *args, **kwargs):
        if kind == "sar_ships":
            raise KeyboardInterrupt("stopped")
        return real_write(out_dir, kind, *args, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic_coco", stopped_at_ships)
    with pytest.raises(KeyboardInterrupt):
        write_domain(tmp_path, {"buildings": 2, "sar_ships": 1}, size=64, seed=3)
    assert not (tmp_path / "annotations.json").exists()
    monkeypatch.undo()
    path = write_domain(tmp_path, {"buildings": 2, "sar_ships": 1}, size=64, seed=3)
    coco = json.loads(path.read_text())
    assert [c["name"] for c in coco["categories"]] == ["building", "ship"] and len(coco["images"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations.json", "images"]


def test_demo_flags_refused_before_any_work(capsys):
    for flags, message in ((["--size", "128"], "--size must be 256"), (["--overlays", "-1"], "--overlays must be at least 0")):
        with pytest.raises(SystemExit):
            demo.main(flags)
        assert message in capsys.readouterr().err


def test_targets_and_a_table_without_ships():
    assert demo.DEFAULT_TARGET == "rooftops-ships"
    assert target_kinds("rooftops-ships", 64) == {"rooftop_buildings": 48, "sar_ships": 16}
    assert target_kinds("dense", 64) == {"buildings": 48, "sar_ships": 16}
    assert target_kinds("rooftops", 64) == {"rooftop_buildings": 64}
    with pytest.raises(ValueError, match="unknown demo target 'city'"):
        target_kinds("city", 64)
    row = {key: (0.5, 0.02) for key in ("miou", "f1", "precision", "recall", "miou_buildings")}
    table = format_table({"direct": {**row, "n": 1}})
    assert table.splitlines()[-1].split()[-2:] == ["-", "1"]  # no ships in this target


def test_robust_teacher_is_trained_from_the_base_model_and_cached(tmp_path, monkeypatch):
    source = write_domain(tmp_path / "source", {"sparse_buildings": 4}, size=256, seed=1, object_scale=2.0)
    base = tmp_path / "base.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), base)
    calls = []

    def counting_pretrain(model, **kwargs):
        calls.append(kwargs)
        return real_pretrain(model, **{**kwargs, "max_instances": 2, "log_every": 0})

    monkeypatch.setattr("resam_dist.train.pretrain.pretrain", counting_pretrain)
    first = demo.robust_checkpoint(tmp_path / "cache", base, source, steps=2, lr=1e-4, photometric=0.5)
    assert first.exists() and len(calls) == 1 and calls[0]["photometric"] == 0.5
    again = demo.robust_checkpoint(tmp_path / "cache", base, source, steps=2, lr=1e-4, photometric=0.5)
    assert again == first and len(calls) == 1  # cached
    other = demo.robust_checkpoint(tmp_path / "cache", base, source, steps=2, lr=1e-4, photometric=1.0)
    assert other != first and len(calls) == 2
    trained, initial = torch.load(first), torch.load(base)
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)
    torch.save(build_sam("tiny", seed=1).state_dict(), base)  # the base pretrained again, same name
    rebuilt = demo.robust_checkpoint(tmp_path / "cache", base, source, steps=2, lr=1e-4, photometric=0.5)
    assert rebuilt not in (first, other) and len(calls) == 3


def test_output_folder_is_refused_when_made_with_other_settings(tmp_path):
    out = tmp_path / "demo"
    demo.claim_output_folder(out, {"target": "rooftops-ships", "adaptation_steps": 120})
    demo.claim_output_folder(out, {"target": "rooftops-ships", "adaptation_steps": 120})  # the same: reused
    demo.claim_output_folder(out, {"teacher_sha256": "ab"})  # a key not yet recorded is added
    assert json.loads((out / "demo_settings.json").read_text()) == {
        "target": "rooftops-ships", "adaptation_steps": 120, "teacher_sha256": "ab"}
    with pytest.raises(ValueError, match="target 'rooftops-ships' there, 'dense' now"):
        demo.claim_output_folder(out, {"target": "dense", "adaptation_steps": 120})
    with pytest.raises(ValueError, match="teacher_sha256 'ab' there, 'cd' now"):
        demo.claim_output_folder(out, {"teacher_sha256": "cd"})
    old = tmp_path / "old"  # a folder of an earlier demo version: data but no settings file
    (old / "coco").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no demo_settings.json"):
        demo.claim_output_folder(old, {"target": "dense"})
    demo.claim_output_folder(tmp_path / "empty", {"target": "dense"})  # a new folder is fine
    assert (tmp_path / "empty" / "demo_settings.json").exists()


@pytest.mark.parametrize("flag,value,least", [("--pretrain-steps", "0", 1), ("--steps", "0", 1),
                                              ("--robust-steps", "-1", 0), ("--ranks", "0", 1)])
def test_step_and_rank_counts_are_checked_before_anything_runs(tmp_path, capsys, flag, value, least):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as raised:
        demo.main([flag, value, "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert raised.value.code == 2
    assert f"{flag} must be at least {least}, got {value}" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
