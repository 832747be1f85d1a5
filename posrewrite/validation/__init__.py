"""Validation in onnxruntime, by part: `report` (rows and notes), `runs` (sessions, feeds, whole-model runs and
comparisons), `bounded` (the same on a cut of the model), `scope` (bounded or full), `rotations` (the rotation
oracle). What a rewrite claims and the checks that follow from it: `posrewrite.validate` (the entry points).
Importing the package imports none of its modules."""
