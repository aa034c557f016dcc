"""Planning a prune before any work: peak memory per device, from shapes alone.

`planner` (what a prune will need, and the group count that fits), `memory` (the plan model and its check
against free memory), `profile` (one denoiser forward measured on the meta device), `sizes` (bytes of loaded
components and of safetensors files, from their headers).
"""
