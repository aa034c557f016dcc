"""Quality of a (pruned) model: images from fixed seeds and prompts, compared with a reference and real data.

Metrics (keys of `metrics.json`):
- `digit_accuracy`, `digit_confidence`, `fd_real` (models built on `builtin:digits`): the digit classifier
  judges each image; `fd_real` is the Frechet distance between classifier features of the generated
  images and of the held-out real digits (the FID analogue for this model).
- with a reference model: `psnr_vs_reference`, `latent_rel_mse_vs_reference` (same seed and prompt
  through both models: how far the trajectory drifted) and `fd_reference` (classifier features for
  digits, CLIP image features when a CLIP model is given).
- `clip_score` when `clip_model` points to a CLIP checkpoint (a local folder or a hub id in the hub cache).
- with `standard_metrics` (the `metrics` extra): torchmetrics' `CLIPScore` (`torchmetrics_clip_score`) and, with a
  reference, `FrechetInceptionDistance` on torch-fidelity's Inception (`torchmetrics_fid_vs_reference`): the
  implementations papers report, so numbers compare with published ones (for FID only at the same image count
  and reference set: thousands of images, real photos).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from obsdiff.errors import ConfigError, ModelLoadError, first_line
from obsdiff.eval import metrics as M
from obsdiff.progress import tqdm
from obsdiff.runs.loading import LoadedModel, as_loaded, load_pipeline

log = logging.getLogger(__name__)

# Used for models that are not builtin:digits when the user gives no prompts file.
GENERIC_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
    "a lighthouse at sunset, oil painting",
    "a astronaut riding a horse",
    "a cup of coffee with latte art",
    "a snowy forest at dawn",
    "a portrait of an old fisherman",
)
# CLIPScore's usual model (torchmetrics' default), used with --standard-metrics when no --clip-model is given
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class EvalConfig:
    """What to generate. `None` settings fall back to the model's own generation defaults."""

    num_images: int = 200
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 50
    prompts: tuple[str, ...] | None = None
    clip_model: str | None = None
    height: int | None = None  # image pixels; None: the model's default
    width: int | None = None
    standard_metrics: bool = False  # torchmetrics' CLIPScore and FID (the `metrics` extra)
    inception_weights: str | None = None  # FID network weights file; None: the torch hub cache

    def __post_init__(self):
        if self.num_images < 2:
            raise ConfigError(f"--num-images {self.num_images}: need at least 2 images for distribution metrics")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: must be at least 1")
        if self.prompts is not None and not self.prompts:
            raise ConfigError("the prompts list is empty; give at least one prompt")
        if self.inception_weights is not None and not self.standard_metrics:
            raise ConfigError(f"--inception-weights {self.inception_weights!r} is used only with --standard-metrics; "
                              "add it or drop the weights")


@dataclass
class Generated:
    images: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    latents: np.ndarray  # (N, C, h, w) final latents before VAE decoding
    seconds: float
    settings: dict = field(default_factory=dict)


def load_models(models: list, device, dtype, progress: bool) -> list[LoadedModel | None]:
    """Each of `models` (a reference to load, a pipeline, or None) as a `LoadedModel`, with a bar over the ones
    read from disk (the libraries' own loading bars are silenced while obsdiff loads)."""
    paths = [m for m in models if isinstance(m, str | Path)]
    loaded = []
    with tqdm(total=len(paths), desc="load models", unit="model", disable=not progress or not paths) as bar:
        for m in models:
            if isinstance(m, str | Path):
                bar.set_postfix_str(str(m))
                loaded.append(load_pipeline(str(m), device=device, dtype=dtype))
                bar.update()
            else:
                loaded.append(as_loaded(m) if m is not None else None)
    return loaded


def prompts_for(model: LoadedModel, config: EvalConfig) -> tuple[list[str], list[int] | None]:
    """The evaluation prompts and, for the digits model, the digit each asks for."""
    n = config.num_images
    if model.builtin == "digits" and config.prompts is None:
        from obsdiff.builtin.digits import eval_prompts

        return eval_prompts(n)
    pool = list(config.prompts or GENERIC_PROMPTS)
    prompts = [pool[i % len(pool)] for i in range(n)]
    if model.builtin == "digits":
        from obsdiff.builtin.digits import digit_of_prompt

        labels = [digit_of_prompt(p) for p in prompts]
        if all(lbl is not None for lbl in labels):
            return prompts, labels
    return prompts, None


@torch.no_grad()
def generate(model: LoadedModel, prompts: list[str], seeds: list[int], steps: int | None = None,
             guidance: float | None = None, batch_size: int = 50, progress: bool = True,
             **overrides) -> Generated:
    """Run the pipeline once per prompt; image i starts from the noise of `seeds[i]` whatever the batch."""
    pipe = model.pipeline
    kwargs = dict(model.generation_defaults)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    device = model.denoiser.device
    images, latents = [], []
    t0 = time.perf_counter()
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"generate {model.name}", unit="batch", disable=not progress):
        batch = prompts[start:start + batch_size]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[start:start + batch_size]]
        z = pipe(prompt=batch, generator=gens, output_type="latent", **kwargs).images
        z = model.family.latents_for_vae(pipe, z, kwargs.get("height"), kwargs.get("width"))
        latents.append(z.float().cpu().numpy())
        images.append(decode_latents(pipe, z))
    seconds = time.perf_counter() - t0
    return Generated(np.concatenate(images), np.concatenate(latents), seconds, kwargs)


def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Final latents -> images (N, H, W, C) in [0, 1], exactly as the pipeline's own decoding."""
    vae = pipe.vae
    shift = vae.config.shift_factor or 0.0
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    image = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np").astype(np.float32)


def _digit_judgement(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classifier probabilities (N, 10) and features (N, 128) of generated images."""
    from obsdiff.builtin.digits import load_classifier, to_model_images

    clf = load_classifier()
    with torch.no_grad():
        x = to_model_images(images)
        feats = clf.features(x)
        probs = torch.softmax(clf.head(feats), dim=1)
    return probs.numpy(), feats.numpy()


@lru_cache(maxsize=1)
def real_digit_features() -> np.ndarray:
    """Classifier features of the held-out real digits (computed once per process: they never change)."""
    from obsdiff.builtin.digits import load_classifier, load_real_test, to_model_images

    images, _ = load_real_test()
    with torch.no_grad():
        return load_classifier().features(to_model_images(images)).numpy()


def digit_metrics(images: np.ndarray, labels: list[int]) -> tuple[dict, np.ndarray]:
    probs, feats = _digit_judgement(images)
    y = np.asarray(labels)
    pred = probs.argmax(1)
    per_digit = {str(d): float((pred[y == d] == d).mean()) for d in range(10) if (y == d).any()}
    out = {
        "digit_accuracy": float((pred == y).mean()),
        "digit_confidence": float(probs[np.arange(len(y)), y].mean()),
        "fd_real": M.feature_frechet_distance(feats, real_digit_features()),
        "per_digit_accuracy": per_digit,
    }
    return out, feats


def load_clip(clip_model: str):
    """A CLIP checkpoint -> (CLIPModel, CLIPProcessor): a local directory, or a hub id already in the hub cache
    (never downloaded here)."""
    path = Path(clip_model)
    is_hub_id = not path.exists() and clip_model.count("/") == 1 and not clip_model.startswith((".", "/", "~"))
    if not path.is_dir() and not is_hub_id:
        raise ModelLoadError(f"--clip-model {clip_model!r} is not a directory; pass a local CLIP checkpoint or a hub "
                             "id (org/name) in the hub cache")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
    except Exception as exc:
        if is_hub_id:
            raise ModelLoadError(f"CLIP model {clip_model!r} is not in the hub cache; download it once (hf download "
                                 f"{clip_model}) or pass --clip-model DIR") from None
        raise ModelLoadError(f"could not load a CLIP model and processor from {clip_model!r}: "
                             f"{first_line(exc)}") from exc
    return model, processor


def clip_features(images: np.ndarray, prompts: list[str], clip) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised CLIP image and text embeddings; `clip` is what `load_clip` returns."""
    model, processor = clip
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels.repeat(3, axis=-1)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return img.numpy(), txt.numpy()


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIPScore: 100 * max(cos(image, text), 0), averaged over pairs."""
    return float((100 * np.clip((image_emb * text_emb).sum(-1), 0, None)).mean())


def evaluate(model: str | LoadedModel, reference: str | LoadedModel | None = None,
             config: EvalConfig = EvalConfig(), device: str | None = "cpu", dtype: str = "fp32",
             progress: bool = True, fid_features: torch.nn.Module | None = None) -> dict:
    """Generate `config.num_images` images (and the same from `reference`) and measure them.

    Returns a report dict: metrics, per-digit accuracies, settings, timing. The generated images are
    under the private keys `_images` / `_reference_images` (not written to JSON). `fid_features` replaces
    the FID Inception network (tests).
    """
    # Everything that can fail without generating (packages, checkpoints, weights) fails first.
    standard = None
    if config.standard_metrics:
        from obsdiff.eval.standard_metrics import require_torchmetrics, standard_metrics

        require_torchmetrics()
    clip = load_clip(config.clip_model) if config.clip_model else None
    if config.standard_metrics:
        standard = standard_metrics(clip or load_clip(DEFAULT_CLIP), reference is not None, config.inception_weights,
                                    fid_features)
    m, ref = load_models([model, reference], device, dtype, progress)
    prompts, labels = prompts_for(m, config)
    seeds = [config.seed + i for i in range(len(prompts))]
    size = {"height": config.height, "width": config.width}
    gen = generate(m, prompts, seeds, config.steps, config.guidance, config.batch_size, progress, **size)
    metrics: dict = {"num_images": len(prompts), "seconds_per_image": gen.seconds / len(prompts)}
    feats = ref_feats = None
    if labels is not None:
        digit, feats = digit_metrics(gen.images, labels)
        metrics.update(digit)
    ref_gen = None
    if ref is not None:
        ref_gen = generate(ref, prompts, seeds, config.steps, config.guidance, config.batch_size, progress, **size)
        if ref_gen.images.shape != gen.images.shape:
            raise ConfigError(f"model and reference produce different image shapes "
                              f"{gen.images.shape[1:]} vs {ref_gen.images.shape[1:]}; compare models of one base")
        metrics["psnr_vs_reference"] = M.psnr(gen.images, ref_gen.images)
        metrics["latent_rel_mse_vs_reference"] = M.relative_mse(gen.latents, ref_gen.latents)
        metrics["reference_seconds_per_image"] = ref_gen.seconds / len(prompts)
        if labels is not None:
            ref_digit, ref_feats = digit_metrics(ref_gen.images, labels)
            metrics["reference_digit_accuracy"] = ref_digit["digit_accuracy"]
            metrics["reference_fd_real"] = ref_digit["fd_real"]
            metrics["fd_reference"] = M.feature_frechet_distance(feats, ref_feats)
    if clip is not None:
        img_emb, txt_emb = clip_features(gen.images, prompts, clip)
        metrics["clip_score"] = clip_score(img_emb, txt_emb)
        if ref_gen is not None:
            ref_img_emb, ref_txt = clip_features(ref_gen.images, prompts, clip)
            metrics["reference_clip_score"] = clip_score(ref_img_emb, ref_txt)
            if "fd_reference" not in metrics:
                metrics["fd_reference"] = M.feature_frechet_distance(img_emb, ref_img_emb)
    if standard is not None:
        metrics["torchmetrics_clip_score"] = standard.clip(gen.images, prompts)
        if ref_gen is not None:
            metrics["reference_torchmetrics_clip_score"] = standard.clip(ref_gen.images, prompts)
            metrics["torchmetrics_fid_vs_reference"] = standard.fid_vs(gen.images, ref_gen.images)
    from obsdiff.runs.artifacts import machine, versions

    return {
        "model": m.ref,
        "reference": ref.ref if ref is not None else None,
        "family": m.family.name,
        "config": asdict(config) | {"prompts": None if config.prompts is None else list(config.prompts)},
        "generation": gen.settings,
        "metrics": metrics,
        "prompts": prompts,
        "seeds": seeds,
        "versions": versions(),
        "machine": machine(),
        "_images": gen.images,
        "_reference_images": ref_gen.images if ref_gen is not None else None,
    }


IMAGES_DIR = "images"


def save_report(report: dict, out_dir: str | Path, force: bool = False, sheet_cells: int = 40) -> Path:
    """Write into `out_dir`, atomically: `metrics.json`, `sheet.png` (reference | pruned per prompt, captioned),
    `images/pruned_XXXX.png` and `images/ref_XXXX.png` (every image), `grid.png` / `grid_reference.png`."""
    from PIL import Image

    from obsdiff.eval.sheet import render_sheet, to_pil
    from obsdiff.runs.artifacts import staged_dir, write_json

    images, ref_images = report["_images"], report.get("_reference_images")
    with staged_dir(out_dir, force=force) as tmp:
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        write_json(tmp / "metrics.json", public)
        (tmp / IMAGES_DIR).mkdir()
        for prefix, batch in (("pruned", images), ("ref", ref_images)):
            for i, image in enumerate(batch if batch is not None else ()):
                to_pil(image).save(tmp / IMAGES_DIR / f"{prefix}_{i:04d}.png")
        columns = [images] if ref_images is None else [ref_images, images]
        labels = [f"{report['model']}"] if ref_images is None else [
            f"left: reference ({report['reference']})", f"right: pruned ({report['model']})"]
        render_sheet(columns, report["prompts"], labels, max_cells=sheet_cells).save(tmp / "sheet.png")
        for batch, name in ((images, "grid.png"), (ref_images, "grid_reference.png")):
            if batch is None:
                continue
            grid = M.image_grid(batch[:100], cols=10, scale=max(1, 64 // batch.shape[1]))
            Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(tmp / name)
    return Path(out_dir)
