"""Calibration: the pipeline runs whose denoiser calls fill the Hessians of a group of linears.

`calibrate` (the passes and the two calibrators), `hooks` (what the passes register on modules), `caches` (the
cached block inputs of the cached calibrator), `prompts` (the calibration prompts), `placement` (where tensors
and components sit while a group calibrates).
"""
