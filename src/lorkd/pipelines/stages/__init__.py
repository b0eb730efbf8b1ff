"""The stages of a decomposition run, generic code over :class:`~lorkd.pipelines.core.recipe.DecompositionRecipe`:
teacher (with :mod:`.adapt` for a loaded foundation model), student (with :mod:`.search`),
baselines, export, evaluate; :mod:`.drive` runs them in order."""
