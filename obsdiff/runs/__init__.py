"""Models and runs on disk: resolving a `--model` value (`hub`), loading it (`loading`), run directories
(`io` writes and reads the record, `rebuild` reads a pruned denoiser back, `shrink` is the structured plan they
replay), and the staged, checked file writes every output goes through (`artifacts`)."""
