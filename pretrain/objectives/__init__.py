"""Objectives by name; each module defines ``Config`` (its config section) and ``Objective``.

The trainer names none of them: it builds whatever ``objective.name`` selects from this table
(:mod:`pretrain.objectives.build`). pretrain.config reads it for the objective's config section, so
this package imports nothing: an objective's module is imported when it is looked up.
"""

OBJECTIVES = {
    "supervised": "pretrain.objectives.supervised",
    "dino": "pretrain.objectives.dino",
    "moby": "pretrain.objectives.moby",
    "simmim": "pretrain.objectives.simmim",
    "dinov2": "pretrain.objectives.dinov2",
}
