"""Built-in recipes: ``DEMO`` runs the whole classification recipe on the embedded synthetic
data (no files needed) in a few minutes on 2 CPU cores."""

_SHORT = {"optim": {"lr": 0.05, "warmup_epochs": 0.5}, "batch_size": 64}

DEMO = {
    "seed": 0,
    "data": {"synthetic": {"num_tasks": 3, "size": 28, "n_train": 600, "n_val": 150, "n_test": 300}},
    "teacher": {"net": {"arch": "resnet18"}, "train": {"epochs": 6, **_SHORT}},
    "student": {
        "net": {"arch": "resnet18", "widen": 0.25},
        "experts": {"rank": 4, "alpha": 16, "norm": "per_task"},
        "distill": {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0},
        "train": {"epochs": 8, **_SHORT},
    },
    "baselines": {"run": ["stl", "mtl", "student_nokd"]},
}
