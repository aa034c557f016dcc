"""Evaluation of a model against a reference: `evaluate` (generation and the report), `metrics` (the paired
metrics), `standard_metrics` (CLIPScore and FID), `sheet` (image sheets), `plots` (a prune's report as charts)."""
