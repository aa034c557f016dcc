"""The pruning math: OBS solves (`obs`), Hessians and their timestep weights (`hessian`), the method registry
(`methods`). Pure tensor code: no model, pipeline or file in sight."""
