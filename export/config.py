"""What to export and how: `ExportConfig`, validated on construction (CLI flags map to its fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from obsdiff.devices import DTYPES as MODEL_DTYPES
from obsdiff.errors import ConfigError

COMPONENTS = ("transformer", "vae-decoder", "text-encoders")
COMPONENT_CHOICES = (*COMPONENTS, "all")
ALIASES = {"denoiser": "transformer", "unet": "transformer", "vae": "vae-decoder", "text-encoder": "text-encoders"}
DTYPES = tuple(MODEL_DTYPES)
EXPORTERS = ("dynamo", "legacy")
OPSETS = {"dynamo": (18, 23), "legacy": (14, 20)}  # dynamo at 17 writes an invalid Split
BF16_MIN_OPSET = 22  # ONNX Conv, Sin and Cos take bfloat16 only from opset 22


def parse_range(value: str | int | tuple | None, flag: str) -> tuple[int, int, int] | None:
    """`MIN:OPT:MAX` (or one number N, meaning N:N:N) -> (min, opt, max)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value, value
    parts = list(value) if isinstance(value, tuple | list) else str(value).split(":")
    try:
        nums = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {value!r} is not MIN:OPT:MAX or N (positive integers)") from None
    if len(nums) == 1:
        nums *= 3
    if len(nums) != 3 or not 1 <= nums[0] <= nums[1] <= nums[2]:
        raise ConfigError(f"{flag} {value!r}: give MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(nums)


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. Ranges are (min, opt, max): the TensorRT optimization profile.

    `height`/`width` are in latent pixels (unpacked for Flux), `text_len` in denoiser text tokens; None
    takes the model's defaults. `component_dtypes` forces a precision per component, e.g.
    (("vae-decoder", "fp16"),) to override the VAE's fp32 policy. `external_data`: always write weights
    to a `.data` file (otherwise only above 2 GB). `polygraphy_max_weights`: the N:M cross-check runs
    polygraphy's own pure-Python per-tensor check up to this many candidate weights, a streamed numpy scan
    of the same rule above it (the sidecar's `nm_crosscheck.tool` says which).
    """

    component: str = "transformer"
    dtype: str = "fp32"
    opset: int = 18
    batch: tuple[int, int, int] = (1, 2, 8)
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    text_len: tuple[int, int, int] | None = None
    exporter: str = "dynamo"
    linear_as_gemm: bool = False
    external_data: bool = False
    component_dtypes: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"
    seed: int = 0
    parity: bool = True
    polygraphy_max_weights: int = 20_000_000

    def __post_init__(self):
        comp = ALIASES.get(self.component, self.component)
        if comp not in COMPONENT_CHOICES:
            raise ConfigError(f"unknown component {self.component!r}; use one of {', '.join(COMPONENT_CHOICES)}")
        object.__setattr__(self, "component", comp)
        for name, flag in (("batch", "--batch"), ("height", "--height"), ("width", "--width"),
                           ("text_len", "--text-len")):
            object.__setattr__(self, name, parse_range(getattr(self, name), flag))
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"unknown exporter {self.exporter!r}; use dynamo or legacy")
        self._check_dtype(self.dtype, "--dtype")
        forced = []
        for item in self.component_dtypes:
            comp_name, dtype = item if isinstance(item, tuple | list) else str(item).split("=", 1)
            comp_name = ALIASES.get(comp_name, comp_name)
            if comp_name not in COMPONENTS:
                raise ConfigError(f"--component-dtype {comp_name}={dtype}: unknown component; use one of "
                                  f"{', '.join(COMPONENTS)}")
            self._check_dtype(dtype, f"--component-dtype {comp_name}={dtype}")
            forced.append((comp_name, dtype))
        object.__setattr__(self, "component_dtypes", tuple(forced))
        lo, hi = OPSETS[self.exporter]
        if not lo <= self.opset <= hi:
            raise ConfigError(f"--opset {self.opset} is outside what the {self.exporter} exporter writes correctly "
                              f"({lo}..{hi}); use --opset 18 or 20")

    def _check_dtype(self, dtype: str, flag: str) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"{flag}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if dtype == "bf16" and self.opset < BF16_MIN_OPSET:
            hint = ("the legacy exporter stops at opset 20: use --exporter dynamo --opset 22"
                    if self.exporter == "legacy" else "use --opset 22")
            raise ConfigError(f"{flag} bf16 cannot be exported at opset {self.opset}: ONNX Conv, Sin and Cos take "
                              f"bfloat16 only from opset {BF16_MIN_OPSET}; {hint}")

    def components(self) -> list[str]:
        return list(COMPONENTS) if self.component == "all" else [self.component]

    def dtype_for(self, component: str) -> tuple[str, bool]:
        """The precision requested for `component` and whether the user forced it per component."""
        forced = dict(self.component_dtypes)
        return (forced[component], True) if component in forced else (self.dtype, False)

    def to_dict(self) -> dict:
        return asdict(self)
