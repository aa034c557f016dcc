"""Pruning: one session runs every sparsity type group by group.

`session` (the group loop), `prune` (`prune_`, unstructured and N:M units), `structured` (the structured
strategy), `allocation` (sensitivity allocation of structured sparsity), `records` (what a prune reports),
`resume` (checkpoints), `distributed` (torchrun ranks), `flops` (parameters and FLOPs of a forward).
"""
