"""Routing a segmentation student without a task id (``student.router`` in the segmentation recipe):
the router's view of a case, one-hot routing of a segmenter, the per-case scores, config errors, and a
tiny routed run end to end (export, ONNX, predict on a volume file)."""

from __future__ import annotations

import csv
import io
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from lorkd.config import from_dict
from lorkd.engine.distributed import DistributedContext
from lorkd.engine.inference import sliding_window_logits
from lorkd.distill import router_loss
from lorkd.errors import ConfigError
from lorkd.models.router import RoutedStudent, TaskRouter, load_routed, router_view
from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from lorkd.pipelines.recipes import segmentation_routing as SR
from lorkd.pipelines.recipes.segmentation import SegmentationRecipe, predictor_for
from lorkd.pipelines.schema import SegmentationConfig
from lorkd.pipelines.stages.routed import load_router, stage_export_routed
from lorkd.report.routing import routing_section
from test_segmentation import blob_case, run_cli, tiny_config, write_h5_task

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STEPS = 40
ROUTER = {"net": {"channels": [4, 8], "projection_dim": 8}}


def seg_config(cfg: dict) -> SegmentationConfig:
    return from_dict(SegmentationConfig, {k: v for k, v in cfg.items() if k != "recipe"})


# ---------------------------------------------------------------------------------------- the router's input
def test_router_view_z_scores_each_channel_then_resizes():
    image = torch.stack([torch.arange(60.0).reshape(3, 4, 5) * 7 + 3, torch.full((3, 4, 5), 2.0)])
    view = router_view(image, [6, 8, 8])
    assert view.shape == (2, 6, 8, 8) and view.dtype == torch.float32
    torch.testing.assert_close(router_view(image * 0.5 + 9, [6, 8, 8]), view)  # any intensity scale
    assert view[1].abs().max() == 0  # a constant channel becomes 0
    flat = router_view(image[0, 0][None], [4, 5])[0]  # 2D at its own size: the z-scored slice
    torch.testing.assert_close(flat, (image[0, 0] - image[0, 0].mean()) / image[0, 0].std(unbiased=False))
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        router_view(image, [8, 8])


# ---------------------------------------------------------------------------------------- routing a segmenter
def seg_student(dims: int = 3) -> MultiTaskSegmenter:
    torch.manual_seed(0)
    spec = segmentation_backbone_spec("unet", dims, 1, [4, 8], 4, "batch", 0, {})
    student = MultiTaskSegmenter(spec, [3, 2], {"rank": 2, "alpha": 4, "norm": "per_task", "targets": None})
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def test_one_hot_routing_of_a_segmenter_equals_hard_ids_exactly():
    student = seg_student().double()
    x, ids = torch.randn(4, 1, 8, 8, 8, dtype=torch.float64), torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        hard = student(x, ids)
        soft = student(x, torch.nn.functional.one_hot(ids, 2).double())
    for t in (0, 1):
        assert torch.equal(hard.rows[t], soft.rows[t])
        torch.testing.assert_close(soft.logits[t], hard.logits[t], rtol=0, atol=1e-12)
    routed = RoutedStudent(student, TaskRouter(1, 2, spatial_dims=3, channels=[2]).double().eval(), top_k=1)
    with torch.no_grad():
        out = routed(x)
        want = student(x, out.tasks)
    assert out.routing.dtype == torch.int64 and all(torch.equal(out.output.logits[t], want.logits[t])
                                                    for t in want.logits)


# ---------------------------------------------------------------------------------------- scores
def test_routed_dice_keeps_the_true_id_dice_of_cases_routed_right_and_zero_otherwise():
    routes = {0: np.array([0, 1, 0]), 1: np.array([1, 1])}
    true_id = {0: SR.case_dice([[0.8, 0.6], [0.9, 0.9], [0.5, np.nan]]), 1: np.array([0.7, 0.9])}
    routed = SR.routed_dice(routes, true_id)
    np.testing.assert_allclose(routed[0], [0.7, 0.0, 0.5])
    np.testing.assert_allclose(routed[1], [0.7, 0.9])
    summary = SR.summarize(routes, routed, {"true_id": true_id}, ["a", "b"], metric="dice", unit="cases")
    assert summary["confusion"] == [[2, 1], [0, 2]] and summary["route_acc"]["value"] == pytest.approx(0.8)
    a = summary["per_task"]["a"]
    assert a["task_agnostic_dice"]["value"] == pytest.approx(0.4) and a["true_id_dice"]["value"] == pytest.approx(0.7)
    assert a["task_agnostic_minus_true_id"]["value"] == pytest.approx(-0.3)
    text = "\n".join(routing_section({"routing": summary}))
    assert "task-agnostic dice" in text and "over all test cases" in text and "test cases)" in text


# ---------------------------------------------------------------------------------------- config errors
def two_tasks(tmp_path):
    a = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3, patients=4, frames=1)
    b = write_h5_task(tmp_path / "b", shape=(8, 20, 16), classes=2, patients=4, frames=1)
    return [{"name": "a", "path": str(a), "num_classes": 3}, {"name": "b", "path": str(b)}]


def test_a_2d_student_on_volumes_needs_the_routers_input_size(tmp_path):
    tasks = two_tasks(tmp_path)
    cfg = tiny_config(tasks, [16, 16])
    cfg["student"]["router"] = ROUTER
    with pytest.raises(ConfigError, match=r"student\.router\.input_size: the cases are 3D and the patches 2D"):
        SegmentationRecipe(seg_config(cfg), tmp_path / "run", CPU)
    cfg["student"]["router"] = {**ROUTER, "input_size": [8, 8]}
    with pytest.raises(ConfigError, match=r"student\.router\.input_size: \[8, 8\] needs 3 sizes"):
        SegmentationRecipe(seg_config(cfg), tmp_path / "run", CPU)
    cfg["student"]["router"] = {**ROUTER, "input_size": [4, 8, 8]}
    run = SegmentationRecipe(seg_config(cfg), tmp_path / "run", CPU)
    assert run.router_input_shape() == (1, 4, 8, 8)
    rows = run.router_views()(torch.tensor([0, 1, 1]), 3)
    assert rows.shape == (3, 1, 4, 8, 8)
    torch.testing.assert_close(rows, run.router_views()(torch.tensor([0, 1, 1]), 3))  # the same at the same step


def test_the_router_learns_to_route_whole_cases_from_its_training_rows(tmp_path):
    cfg = tiny_config(two_tasks(tmp_path), [4, 8, 8])
    cfg["student"]["router"] = {**ROUTER, "input_size": [4, 8, 8]}
    run = SegmentationRecipe(seg_config(cfg), tmp_path / "run", CPU)
    torch.manual_seed(0)
    router = TaskRouter(1, 2, spatial_dims=3, channels=[4, 8], projection_dim=8)
    opt = torch.optim.Adam(router.parameters(), lr=0.01)
    for step in range(STEPS):
        ids = torch.tensor([0, 1, 0, 1])
        out = router(run.router_views()(ids, step))
        loss = router_loss(out.logits, out.projection, ids, twd_weight=0.1, task_loss_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    routes = SR.route_cases(router, run.views, run.volumes("train"), torch.device("cpu"))
    assert {t: r.tolist() for t, r in routes.items()} == {0: [0, 0], 1: [1, 1]}
    assert router.training  # restored


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def routed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segroute")
    cfg = tiny_config(two_tasks(tmp), [4, 8, 8], evaluate={"latency_repeats": 1, "hd95": False})
    cfg["student"]["router"] = {**ROUTER, "input_size": [4, 8, 8]}
    cfg["student"]["train"]["epochs"] = 2
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("run", tmp / "cfg.yaml", "--out", tmp / "run", "--no-progress") == 0
    return tmp, tmp / "run", cfg


def test_routed_run_scores_each_case_and_reports_it(routed_run):
    _, out, _ = routed_run
    metrics = json.loads((out / "metrics.json").read_text())
    routing = metrics["routing"]
    assert routing["metric"] == "dice" and routing["unit"] == "cases" and routing["router_input"]["size"] == [4, 8, 8]
    assert np.sum(routing["confusion"]) == sum(metrics["tasks"][t]["student"]["cases"] for t in ("a", "b"))
    for name, row in routing["per_task"].items():  # the true-id column is the student's own test Dice
        assert row["true_id_dice"]["value"] == pytest.approx(metrics["tasks"][name]["student"]["dice"])
        assert row["task_agnostic_dice"]["value"] <= row["true_id_dice"]["value"] + 1e-9
    history = [json.loads(line) for line in (out / "student" / "history.jsonl").read_text().splitlines()]
    assert history[0]["router"] > 0 and "val/route_acc" in history[0]
    report = (out / "report.md").read_text()
    assert "## Routing without a task id" in report and "task-agnostic dice" in report


def test_routed_export_reproduces_the_routed_student(routed_run):
    _, out, cfg = routed_run
    card = json.loads((out / "routed" / "routed.json").read_text())
    assert card["task_kind"] == "segmentation" and card["router_input"]["size"] == [4, 8, 8]
    routed = load_routed(out / "routed")
    run = SegmentationRecipe(seg_config(cfg), out, CPU)
    student, router = run.reuse_network(out / "student").eval(), load_router(run)
    ev = cfg["evaluate"]
    for i in range(len(run.test_set)):
        image, _, t, _, _ = run.test_set[i]
        view = run.views.view(run.test_set.items[i][1])[None]
        with torch.no_grad():
            task = int(router(view).logits.argmax(1))
            assert int(routed.router(view).argmax(1)) == task
            want = sliding_window_logits(predictor_for(student, task), image, run.roi, 0.25, 4, "constant")
            got = sliding_window_logits(routed.experts[task], image, run.roi, 0.25, 4, "constant")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert ev["hd95"] is False


def test_predict_routes_a_volume_file_and_writes_its_mask(routed_run, capsys):
    tmp, out, _ = routed_run
    image, _ = blob_case((8, 20, 16), 2, 7)
    affine = np.diag([1.2, 0.9, 0.9, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp / "vol.nii.gz"))
    capsys.readouterr()
    assert run_cli("predict", out / "routed", tmp / "vol.nii.gz", "--output", tmp / "masks") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["task"] in ("a", "b") and 0 < float(rows[0]["task_probability"]) <= 1
    written = nib.load(str(tmp / "masks" / "vol_mask.nii.gz"))
    assert written.shape == image.shape and np.allclose(written.affine, affine)
    classes = 3 if rows[0]["task"] == "a" else 2
    assert set(np.unique(np.asarray(written.dataobj))) <= set(range(classes))
    assert sum(int(rows[0][f"voxels_{c}"]) for c in range(classes)) == image.size


@pytest.mark.slow  # ONNX export of the router and both experts: ~20 s on one thread
def test_routed_export_writes_onnx_checked_against_pytorch(routed_run, tmp_path):
    _, out, cfg = routed_run
    run = SegmentationRecipe(seg_config({**cfg, "export": {"onnx": True}}), out, CPU)
    student, router = run.reuse_network(out / "student").eval(), load_router(run)
    run.out = tmp_path  # write this export beside the run's
    folder = stage_export_routed(run, student, router)
    checks = [f for f in json.loads((folder / "router" / "card.json").read_text())["files"] if f["format"] == "onnx"]
    assert checks[0]["input_shape"][1:] == [1, 4, 8, 8] and checks[0]["max_abs_diff"] <= 1e-4
    assert all((folder / "experts" / t / "expert.onnx").is_file() for t in ("a", "b"))
