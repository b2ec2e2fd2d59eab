"""Objectives by name; each module defines ``Config`` (its config section) and ``Objective``.

The trainer names none of them: it builds whatever ``objective.name`` selects from this table.
"""

OBJECTIVES = {
    "supervised": "pretrain.objectives.supervised",
    "dino": "pretrain.objectives.dino",
    "moby": "pretrain.objectives.moby",
    "simmim": "pretrain.objectives.simmim",
    "dinov2": "pretrain.objectives.dinov2",
}
