"""Built-in recipes: ``DEMO`` runs the whole classification recipe on the embedded synthetic
data (no files needed) in about 4 minutes on 2 CPU cores (5.3 with 1 thread); :func:`demo_config`
gives it a seed.

The demo stages the mechanism that makes decomposition pay: the teacher (the stand-in for a
foundation model) has seen more data than the experts get. It trains on 1500 images per task; the
student and every baseline on the same class-stratified 80 of them (``data.student_n_train``), so
the teacher's knowledge reaches the students only through distillation, and the three tasks compete
for a small student network (quarter-width ResNet-18, 0.7M parameters) where per-task experts and
norms matter. Settings (issue 22, seed 0, 2 threads; mean validation accuracy unless said):

* Students: SGD at lr 0.05 underfitted (KD student 0.79, training accuracy 0.72 on the X-ray task);
  AdamW lr 2e-3, wd 0.05, batch 32 (the teacher's optimiser, doubled lr): 0.95-0.98.
* Teacher: with BatchNorm its per-task validation accuracy swung from epoch to epoch (X-ray 1.0 ->
  0.87 -> 0.83 at lr near 0): shared running statistics follow the task mix of the last batches, and
  the tasks differ in intensity. GroupNorm (8 groups) has no running statistics: 0.987.
* 100 labelled images per task: no-KD student 0.98 test, too close to the teacher for KD to show;
  50: KD student 0.964 vs teacher 0.987 (test 0.966 vs 0.978, below the teacher - 0.01); 80: 0.971
  vs 0.987 (test 0.983 vs 0.978). That choice looked at seed 0's test headline too, which breaks the
  rule; the seed-1 run then failed (issue 22). The 80 stays; what follows was chosen on validation only.

Second pass (issue 22, seeds 0 and 1, 2 threads, validation only: the run folder's ``metrics.json``
``val`` (each model at its best validation epoch) and the last 10 epochs of ``student/history.jsonl``
and ``baselines/student_nokd/history.jsonl`` (``val/acc``), a less selection-biased view; test numbers
and headline not opened). KD student (expert) / teacher / no-KD student, best-epoch val, then the KD
and no-KD students' last-10-epoch mean val:

=================================  ======================  ======================
candidate                          seed 0                  seed 1
=================================  ======================  ======================
first pass (kd 2, T 4, BN 0.1)     .984/.987/.971 .971/.952 .976/.973/.909 .922/.878
kd_weight 4                        .984/.987/.971 .971      .951/.973/.909 .918
feat_weight 1                      .996/.987/.971 .984      .944/.973/.909 .919
BN momentum 0.02                   .987/.987/.982 .983/.978 .991/.973/.922 .950/.916
BN momentum 0.02 + feat_weight 1   .998/.987/.982 .995/.978 .987/.973/.922 .972/.916
BN momentum 0.05 + feat_weight 1   .993/.987/.967 .986/.957 .951/.973/.909 .927/.881
GroupNorm(4) students + feat 1     .951/.987/.944 .942/.913 (not run: below on seed 0)
=================================  ======================  ======================

* The students' validation accuracy swung by up to 40 points between epochs even at a learning rate
  near 0 (seed 1, X-ray: 75 -> 93 -> 81 over the last epochs): per-task BatchNorm running statistics,
  each task seeing about 10 rows of an augmented batch, updated with momentum 0.1, are too noisy to
  evaluate with. A cause of the ultrasound-like task's drops to chance in the students, and it makes
  best-epoch selection a lottery: a slower momentum damps it (0.02: last-10 mean up on both seeds).
* Momentum 0.02 broke the STL baseline (best val 0.50-0.79 per task): an STL model takes 3 steps per
  epoch, so its running statistics still held those of the first epochs. 0.05 (time constant 20
  steps: 7 STL epochs) keeps STL where it was (best val 0.951 vs 0.960 on seed 0, 0.958 vs 0.949 on
  seed 1) but steadies the students less than 0.02 did (seed 1: ultrasound still 0.57 at one epoch
  of the second half). GroupNorm students (no running statistics) were steady but weaker on X-ray.
* Choice (rule fixed before looking: highest last-10 validation mean of the KD student on both seeds,
  every baseline at least where it was): BN momentum 0.05 + ``feat_weight`` 1 (0.986 / 0.927 against
  0.971 / 0.922 for the first pass, KD - no-KD on that measure +0.029 / +0.046). No candidate had,
  on best-epoch validation, both expert >= teacher - 0.01 and KD - no-KD >= 0.02 on both seeds (seed
  1 expert - teacher -0.022 here): the acceptance was expected to be at risk before it was run.
* kd_weight 4 changed nothing beyond noise. Feature distillation (``feat_weight`` 1, MSE through a
  projector on the pooled features) is the channel that carries the teacher's extra data: with steady
  norms it lifts the KD student on both seeds while the no-KD student cannot use it.

Third pass (session 4, seeds 0 and 1, 2 threads, validation only, as above). The hint of the second
pass: evaluate with exact norm statistics. ``*.train.recompute_norm_stats`` recomputes every
BatchNorm's running statistics (per task) before each validation as averages over the training
images without augmentation (all 80 per task here; a validation, the best epoch's ``best.pt`` and
the exported experts then hold them). The BN momentum then no longer matters for evaluation.

=================================  ======================  ======================
candidate                          seed 0                  seed 1
=================================  ======================  ======================
recompute 80 (n_train 80)          .991/.987/.993 .982/.992 .996/.973/.942 .994/.940
recompute 80, n_train 50           .847/.987/.947 .840/.939 .964/.973/.904 .960/.901
recompute 80, n_train 40           .798/.987/.922 .785/.920 .876/.973/.898 .869/.895
=================================  ======================  ======================

* With exact statistics the swings are gone (last-10 means within 0.01 of the best epoch) and both
  students gain: the no-KD student most on seed 0 (0.967 -> 0.993), the KD student on seed 1
  (0.951 -> 0.996). Fewer labelled images (50, 40) made the KD student much weaker than the no-KD
  one on seed 0 (not investigated further: below on both measures, dropped).
* Choice by the rule above: recompute 80 with 80 labelled images (last-10 KD 0.982 / 0.994 against
  0.986 / 0.927; STL 0.953 / 0.958 and MTL 0.918 / 0.969 at least where they were). On seed 0's
  validation the KD student no longer beats the no-KD one (0.991 vs 0.993): the acceptance's KD
  margin was expected to be at risk there before the test runs were made.

Issue 30 (not yet a setting of the demo): ``data.synthetic.family: hard`` (see
:mod:`lorkd.data.synthetic`) gives the same three modalities with 4 classes each, told apart by
small local cues under nuisance variation, so that 80 images per task are not enough. Probe only, no
lorkd training run: a small plain-torch CNN (600 steps of 32, one thread, validation accuracy, seeds
0 / 1), 1500 vs 80 images per task: ultrasound 0.93 vs 0.74 / 0.90 vs 0.67, X-ray 0.74 vs 0.58 /
0.82 vs 0.60, dermoscopy 0.94 vs 0.50 / 0.94 vs 0.48 (the basic family with 80 images: 0.98, 0.99,
1.00 on seed 0). The X-ray task needs more steps (0.89 with 1500 steps on seed 0): a teacher of 6
epochs may underfit it. The demo's settings on this family are still to be chosen on validation.
"""

from __future__ import annotations

import copy
from typing import Any

_STUDENT_OPTIM = {"optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 0.5}, "batch_size": 32}
_TEACHER_OPTIM = {"optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 0.5}, "batch_size": 32}

DEMO: dict[str, Any] = {
    "seed": 0,
    "data": {"synthetic": {"num_tasks": 3, "size": 28, "n_train": 1500, "n_val": 150, "n_test": 300},
             "student_n_train": 80},
    "teacher": {"net": {"arch": "resnet18", "widen": 0.5, "kwargs": {"norm": ["group", {"num_groups": 8}]}}, "train": {"epochs": 6, **_TEACHER_OPTIM}},
    "student": {
        "net": {"arch": "resnet18", "widen": 0.25, "kwargs": {"norm": ["batch", {"momentum": 0.05}]}},
        "experts": {"rank": 4, "alpha": 16, "norm": "per_task"},
        "distill": {"ce_weight": 1.0, "kd_weight": 2.0, "temperature": 4.0, "feat_weight": 1.0},
        "train": {"epochs": 50, "recompute_norm_stats": 80, **_STUDENT_OPTIM},
    },
    "baselines": {"run": ["stl", "mtl", "student_nokd"]},
}


def demo_config(seed: int = 0) -> dict[str, Any]:
    """A copy of :data:`DEMO` whose training and synthetic data both use ``seed``."""
    cfg = copy.deepcopy(DEMO)
    cfg["seed"] = seed
    cfg["data"]["synthetic"]["seed"] = seed
    return cfg
