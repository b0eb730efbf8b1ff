"""``student.distill.search``: candidates scored on validation only, the best one chosen, search.json
and its report table."""

from __future__ import annotations

import pytest
import torch

from lorkd.config import from_dict
from lorkd.errors import ConfigError, DataError
from lorkd.fileio import read_json, write_json
from lorkd.pipelines.core.netio import has_network
from lorkd.pipelines.stages.baselines import stage_baselines
from lorkd.pipelines.stages.student import stage_student
from lorkd.pipelines.stages.teacher import stage_teacher
from lorkd.pipelines.schema import Distill
from lorkd.pipelines.stages.search import search_distill
from lorkd.report.search import search_table

from test_pipelines_features import classification_run


class NoTestSplit:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the search read the test split ({name})")

    def __len__(self):
        raise AssertionError("the search read the test split")

    def __getitem__(self, i):
        raise AssertionError("the search read the test split")


def guarded_run(tmp_path, distill: dict, epochs: int):
    run = classification_run(tmp_path, {"distill": distill, "train": {"epochs": epochs, "batch_size": 16}})
    run.test_set = NoTestSplit()
    splits, dataset = [], run.dataset

    def recording(split, tasks=None):
        splits.append(split)
        return dataset(split, tasks)

    run.dataset = recording
    return run, splits


def test_shorter_search_picks_the_best_validation_mean_then_trains_the_student_again(tmp_path):
    pair = {"student": "backbone.layer3", "teacher": "backbone.layer3", "kind": "cka"}
    search = {"kd_weight": [0.0, 1.0], "feat_weight": [0.0, 2.0], "epochs": 1}
    run, splits = guarded_run(tmp_path, {"features": [pair], "search": search}, epochs=2)
    teacher = stage_teacher(run)
    student = stage_student(run, teacher)
    data = read_json(run.out / "search.json")
    rows = data["candidates"]
    assert [(r["kd_weight"], r["feat_weight"]) for r in rows] == [(0.0, 0.0), (0.0, 2.0), (1.0, 0.0), (1.0, 2.0)]
    assert data["split"] == "val" and data["metric"] == "acc" and data["epochs"] == 1 and not data["full_budget"]
    for r in rows:  # each score is the candidate's own validation accuracy
        model = run.reuse_network(run.out / "search" / r["id"])
        val = run.val_metrics(model)
        assert r["val_mean"] == pytest.approx(val["acc"]) and r["val"] == {n: val[f"acc_{n}"] for n in run.names}
        assert r["val_mean"] == pytest.approx(sum(r["val"].values()) / len(r["val"]))
    best = max(r["val_mean"] for r in rows)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["id"] == data["chosen"]
    assert chosen[0]["val_mean"] == best and chosen[0] is next(r for r in rows if r["val_mean"] == best)
    # the student was trained again, with the full budget and the chosen settings
    history = (run.out / "student" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2 and "search_candidate" not in read_json(run.out / "student" / "model.json")
    assert ("kd" in history[0]) == (chosen[0]["kd_weight"] > 0) and ("feat_0" in history[0]) == (chosen[0]["feat_weight"] > 0)
    assert student is not None and "test" not in splits

    table = search_table(data)
    assert table.count("\n") == 1 + len(rows) and "val acc mean" in table and "| yes |" in table
    assert f"**{chosen[0]['val_mean']:.3f}**" in table


def test_full_budget_search_keeps_the_chosen_model_as_the_student(tmp_path):
    run, splits = guarded_run(tmp_path, {"search": {"temperature": [1.0, 4.0]}}, epochs=1)
    teacher = stage_teacher(run)
    student = stage_student(run, teacher)
    data = read_json(run.out / "search.json")
    assert data["full_budget"] and [r["feat_weight"] for r in data["candidates"]] == [None, None]
    chosen = run.reuse_network(run.out / "search" / data["chosen"])
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), chosen.state_dict().values()))
    assert read_json(run.out / "student" / "model.json")["search_candidate"] == data["chosen"]
    assert not (run.out / "student" / "history.jsonl").exists()  # nothing trained again
    assert "as configured" in search_table(data)
    # the *_kd baselines distil with the chosen settings; the search is not run again
    run.cfg.baselines.run = ["mtl_kd"]
    stage_baselines(run, teacher)
    assert has_network(run.out / "baselines" / "mtl_kd" / "all") and "test" not in splits
    # a changed grid does not reuse this search.json
    run.state.search_result = None
    run.cfg.student.distill.search.temperature = [2.0, 4.0]
    with pytest.raises(DataError, match="another grid"):
        search_distill(run, teacher)



def test_search_candidates_are_fingerprinted_and_recorded_like_every_stage(tmp_path):
    from lorkd.pipelines.core.runfolder import check_fingerprints

    run, _ = guarded_run(tmp_path, {"search": {"temperature": [1.0, 4.0]}}, epochs=1)
    stage_student(run, stage_teacher(run))
    chosen = read_json(run.out / "search.json")["chosen"]
    log = [(e["stage"], e["status"]) for e in run.state.stage_log]
    assert log == [("teacher", "trained"), ("search/c00", "trained"), ("search/c01", "trained"), ("student", "loaded")]
    assert run.state.stage_log[-1]["folder"] == str(run.out / "search" / chosen)
    for stage in ("search/c00", "search/c01", "student"):  # the copied student carries its fingerprint too
        assert read_json(run.out / stage / "fingerprint.json")["stage"] == stage
    assert check_fingerprints(run, reuse=False) == {}
    run.cfg.student.train.optim.lr *= 2
    with pytest.raises(ConfigError, match=r"search/c00 .*student\.train\.optim\.lr"):
        check_fingerprints(run, reuse=False)

def test_search_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="student.distill.search: epochs is set but no list of values is"):
        from_dict(Distill, {"search": {"epochs": 2}}, "student.distill")
    with pytest.raises(ConfigError, match=r"student.distill.search.feat_weight: no feature term"):
        from_dict(Distill, {"search": {"feat_weight": [1.0]}}, "student.distill")
    with pytest.raises(ConfigError, match=r"student.distill.search.temperature: must be > 0"):
        from_dict(Distill, {"search": {"temperature": [0.0]}}, "student.distill")


def test_search_table_needs_candidates(tmp_path):
    with pytest.raises(DataError, match="candidates"):
        search_table({})
    write_json(tmp_path / "search.json", {"metric": "dice", "tasks": ["a"], "epochs": 3, "final": "x",
                                          "candidates": [{"id": "c00", "kd_weight": 1, "temperature": 2,
                                                          "feat_weight": 0.5, "val": {"a": 0.5}, "val_mean": 0.5,
                                                          "chosen": True}]})
    from lorkd.report.search import search_section

    text = "\n".join(search_section(tmp_path))
    assert "| c00 | 1 | 2 | 0.5 | 0.500 | **0.500** | yes |" in text and "validation split only" in text
