"""lorkd.decompose: the classification decomposition from Python on in-memory arrays, with the teacher
trained by the run, given as a lorkd multi-task network, or given as a plain foundation module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import lorkd
from lorkd.pipelines import decompose
from lorkd.config import from_dict
from lorkd.data.memory import Task
from lorkd.errors import ConfigError, DataError
from lorkd.models.backbones import backbone_spec
from lorkd.models.classifier import MultiTaskClassifier
from lorkd.pipelines.recipes.memory import DecompositionResult
from lorkd.pipelines.schema import ClassificationConfig

CFG = {
    "device": "cpu",
    "data": {"augment": False},
    "teacher": {"net": {"arch": "resnet10", "widen": 0.25}, "train": {"epochs": 1, "batch_size": 16},
                "adapt": {"epochs": 1, "batch_size": 16}},
    "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 16}},
    "evaluate": {"latency_repeats": 1},
}
SIZES = {"train": 32, "val": 12, "test": 12}


def tasks(seed: int = 0) -> list[Task]:
    """Two 16 px grayscale tasks (2 and 3 classes) whose label sets the image brightness."""
    rng = np.random.default_rng(seed)
    out = []
    for name, classes in (("a", 2), ("b", 3)):
        labels = {s: np.arange(n) % classes for s, n in SIZES.items()}
        images = {s: np.clip(rng.normal(60 + 60 * y[:, None, None], 20, (len(y), 16, 16)), 0, 255).astype(np.uint8)
                  for s, y in labels.items()}
        out.append(Task(name, images, labels))
    return out


def check_experts_match_the_student(result: DecompositionResult) -> None:
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        for t, name in enumerate(["a", "b"]):
            expected = result.student(x, torch.full((5,), t)).logits[t]
            torch.testing.assert_close(result.experts[name](x), expected, rtol=1e-4, atol=1e-5)
            assert not any("lorkd.experts" in type(m).__module__ for m in result.experts[name].modules())


def test_decompose_with_a_trained_teacher_writes_a_run_folder(tmp_path, capfd):
    result = decompose(None, tasks(), CFG, out=tmp_path / "run")
    err = capfd.readouterr().err  # issue 31: a start-up summary on stderr, as the CLI prints it
    assert "device cpu" in err and "task a: train 32, val 12, test 12" in err and "[teacher] 1 epochs x" in err
    assert result.out == tmp_path / "run"
    for key in ("tasks", "val", "params", "flops", "teacher", "timing_s", "config", "stages", "data"):
        assert key in result.metrics, key
    assert set(result.metrics["tasks"]) == {"a", "b"} and {"student", "expert", "teacher"} <= set(result.metrics["tasks"]["a"])
    assert json.loads((result.out / "metrics.json").read_text())["tasks"] == result.metrics["tasks"]
    assert (result.out / "report.md").is_file() and (result.out / "experts" / "b" / "expert.safetensors").is_file()
    config = yaml.safe_load((result.out / "config.yaml").read_text())
    assert [t["path"].split("@")[0] for t in config["data"]["tasks"]] == ["memory:a", "memory:b"]
    assert result.metrics["teacher"]["source"]["kind"] == "trained"
    assert result.experts["b"].card["classes"] == 3
    check_experts_match_the_student(result)
    # issue 31: the student takes one int task id, has summary() and saves adapters under the run's task names
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.student(x, 1).logits[1], result.student(x, torch.full((3,), 1)).logits[1])
    assert result.student.task_names == ["a", "b"] and "tasks: a (2 classes), b (3 classes)" in str(result.student.summary())
    assert set(lorkd.save_adapters(result.student, tmp_path / "adapters")) == {"a", "b"}


def test_a_multitask_student_takes_an_int_task_id_and_has_a_summary(tmp_path):
    """Issue 31: as an add_experts student, a multi-task student takes one int task id for the batch,
    has summary(), and names its adapters by its task_names (task_<t> without them)."""
    torch.manual_seed(0)
    student = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.125), [2, 3], experts={"rank": 2}).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = student(x, 1)
        torch.testing.assert_close(out.logits[1], student(x, torch.full((3,), 1)).logits[1])
    assert list(out.logits) == [1] and out.rows[1].tolist() == [0, 1, 2]
    for bad, message in ((2, "task id 2 is out of range"), (True, "must be an int"), (1.0, "must be an int")):
        with pytest.raises(ValueError, match=message):
            student(x, bad)
    text = str(student.summary())
    assert "layers with experts; tasks: 2" in text and "tasks: task_0 (2 classes), task_1 (3 classes)" in text
    assert set(lorkd.save_adapters(student, tmp_path / "default")) == {"task_0", "task_1"}
    student.task_names = ["liver", "lung"]
    saved = lorkd.save_adapters(student, tmp_path / "named")
    assert set(saved) == {"liver", "lung"} and lorkd.read_adapter(saved["lung"])["task"] == "lung"
    assert lorkd.read_adapter(lorkd.save_adapter(student, 0, tmp_path / "one"))["task"] == "liver"
    with pytest.raises(ValueError, match="has no experts"):
        MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.125), [2]).summary()


def test_decompose_a_given_multitask_teacher_and_resume_with_its_fingerprints(tmp_path):
    torch.manual_seed(0)
    teacher = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.25), [2, 3])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = from_dict(ClassificationConfig, {**CFG, "data": {"augment": False, "synthetic": {}}})  # a config object (its data is replaced)
    config.data.synthetic = None
    result = decompose(teacher, tasks(), config, out=tmp_path / "run", report=False)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # not modified
    assert result.metrics["teacher"]["source"]["kind"] == "lorkd"
    assert result.metrics["stages"][0] == {"stage": "teacher", "status": "loaded",
                                           "folder": result.metrics["teacher"]["source"]["path"]}
    assert "given_teacher" in result.metrics["teacher"]["source"]["path"]
    check_experts_match_the_student(result)
    # the same teacher and data again: the finished stages are reused
    again = decompose(teacher, tasks(), CFG, out=tmp_path / "run", resume=True, report=False)
    assert [s["status"] for s in again.metrics["stages"]] == ["loaded", "reused"]
    torch.testing.assert_close(again.metrics["tasks"], result.metrics["tasks"])
    # another teacher, or other data: the student's fingerprint differs, the run folder refuses
    other = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.25), [2, 3])
    with pytest.raises(ConfigError, match="teacher.source.path"):
        decompose(other, tasks(), CFG, out=tmp_path / "run", resume=True, report=False)
    with pytest.raises(ConfigError, match=r"data.tasks"):
        decompose(teacher, tasks(seed=1), CFG, out=tmp_path / "run", resume=True, report=False)


class TinyFoundation(nn.Module):
    """A plain module standing in for a foundation model: [B, 1, H, W] -> [B, 8] features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stem(x)).flatten(1)


def test_decompose_a_plain_foundation_module_adapts_its_heads(tmp_path):
    torch.manual_seed(0)
    fm = TinyFoundation()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    result = decompose(fm, tasks(), {**CFG, "teacher": {**CFG["teacher"], "features": "stem"}},
                             out=tmp_path / "run", report=False)
    info = result.metrics["teacher"]
    assert info["source"]["kind"] == "state_dict" and info["adapt"]["mode"] == "heads"
    assert "fitted head on layer 'stem'" in info["distilled"]["a"]
    assert all(torch.equal(v, before[k]) for k, v in fm.state_dict().items()) and fm.training
    check_experts_match_the_student(result)


# ------------------------------------------------------------------------------------ bad inputs
def bad(task_index: int = 0, **change) -> list[Task]:
    ts = tasks()
    for field, value in change.items():
        setattr(ts[task_index], field, value)
    return ts


@pytest.mark.parametrize("make, error, message", [
    (lambda: bad(images={**tasks()[0].images, "train": np.zeros((32, 16, 16), np.complex64)}), DataError,
     r"tasks\[0\] \('a'\) key 'train_images': images of dtype complex64 cannot be read"),
    (lambda: bad(images={**tasks()[0].images, "val": np.zeros((12, 16), np.uint8)}), DataError,
     r"tasks\[0\] \('a'\) key 'val_images': images must be 3D"),
    (lambda: bad(images={**tasks()[0].images, "train": np.full((32, 16, 16), 300, np.int32)}), DataError,
     r"key 'train_images': integer images of dtype int32 hold values in \[300, 300\]"),
    (lambda: bad(1, labels={**tasks()[1].labels, "val": np.zeros(11, np.int64)}), DataError,
     r"tasks\[1\] \('b'\): 'val_images' holds 12 images but 'val_labels' holds 11 labels"),
    (lambda: bad(labels={"train": np.zeros(32, int), "val": np.zeros(12, int)}), DataError,
     r"tasks\[0\] \('a'\).labels: needs exactly the splits .* missing \['test'\]"),
    (lambda: bad(labels={**tasks()[0].labels, "test": np.full(12, 2.5)}), DataError,
     r"tasks\[0\] \('a'\) key 'test_labels': labels of dtype float64 hold non-integer values"),
    (lambda: bad(num_classes=2, labels={**tasks()[0].labels, "test": np.full(12, 4)}), DataError,
     r"tasks\[0\] \('a'\): split 'test' key 'test_labels' holds label 4 >= num_classes=2"),
    (lambda: bad(1, name="a"), DataError, r"task names must be unique, \['a'\]"),
    (lambda: bad(images={s: np.zeros((n, 8, 16, 16), np.uint8) for s, n in SIZES.items()}), DataError,
     r"tasks\[0\] \('a'\) key 'train_images': images of shape \(32, 8, 16, 16\) are ambiguous"),
    (lambda: "not a list", DataError, "tasks: give a non-empty list"),
])
def test_bad_tasks_are_refused_naming_task_split_and_field(make, error, message, tmp_path):
    with pytest.raises(error, match=message):
        decompose(None, make(), CFG, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("teacher, config, message", [
    (None, {"student": {"rnak": 4}}, r"student.rnak: unknown key \(did you mean 'net'\?\)|student.rnak: unknown key"),
    (None, {"student": {"train": {"epochs": 0}}}, "student.train.epochs: must be >= 1"),
    (None, {"data": {"synthetic": {"num_tasks": 2}}}, "data.tasks / data.synthetic: the tasks come from"),
    (None, "config.yaml", "config: expected a ClassificationConfig or a mapping"),
    (None, {"recipe": "segmentation"}, "recipe: lorkd.decompose runs the classification recipe"),
    (TinyFoundation(), {"teacher": {"source": {"kind": "torchscript", "path": "x.pt"}}}, "teacher.source: a teacher "
     "module was given"),
    (3, {}, "teacher: expected an nn.Module"),
])
def test_bad_config_or_teacher_is_refused_naming_the_key(teacher, config, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        decompose(teacher, tasks(), config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_teacher_whose_heads_do_not_fit_the_tasks_is_refused(tmp_path):
    teacher = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.25), [2, 2])
    with pytest.raises(DataError, match=r"teacher: its heads have classes \[2, 2\], the tasks \['a', 'b'\] have \[2, 3\]"):
        decompose(teacher, tasks(), CFG, out=tmp_path / "run")
    rgb = MultiTaskClassifier(backbone_spec("resnet10", 2, 3, 0.25), [2, 3])
    with pytest.raises(DataError, match=r"teacher: the given MultiTaskClassifier fails on the tasks' input \[2, 1, 16, 16\]"):
        decompose(rgb, tasks(), CFG, out=tmp_path / "run2")


def test_lorkd_decompose_is_the_pipelines_function_loaded_on_first_use():
    import subprocess
    import sys

    code = ("import sys, lorkd; assert 'lorkd.pipelines.recipes' not in sys.modules; "
            "from lorkd.pipelines import decompose; assert lorkd.decompose is decompose; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    import lorkd
    with pytest.raises(AttributeError, match="no attribute 'decomposee'"):
        lorkd.decomposee
