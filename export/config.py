"""What to export and how: `ExportConfig`, validated on construction (CLI flags map to its fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from obsdiff.devices import DTYPES as MODEL_DTYPES
from obsdiff.errors import ConfigError

COMPONENTS = ("transformer", "vae-decoder", "text-encoders")
COMPONENT_CHOICES = (*COMPONENTS, "all")
ALIASES = {"denoiser": "transformer", "unet": "transformer", "vae": "vae-decoder", "text-encoder": "text-encoders"}
DTYPES = tuple(MODEL_DTYPES)
AUTO = "auto"  # dtype: the model's deployment precision; opset: the lowest the precision needs
EXPORTERS = ("dynamo", "legacy")
OPSETS = {"dynamo": (18, 23), "legacy": (14, 20)}  # dynamo at 17 writes an invalid Split
DEFAULT_OPSET = 18  # the lowest opset the dynamo exporter writes correctly; fp32 and fp16 need no newer one
BF16_MIN_OPSET = 22  # ONNX Conv, Sin and Cos take bfloat16 only from opset 22


def needed_opset(dtypes) -> int:
    """The lowest opset that writes every precision in `dtypes` correctly."""
    return BF16_MIN_OPSET if "bf16" in dtypes else DEFAULT_OPSET


def parse_opset(value: int | str) -> int | str:
    """An opset number, or "auto"."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool):
        value = str(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--opset {value!r} is not a number or auto") from None


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

    `dtype` "auto" is the model's deployment precision (`ModelFamily.onnx_dtype`: what TensorRT's diffusion
    demo builds it in) and `opset` "auto" the lowest opset that precision needs; `resolve` turns them into
    values once the model is known (`export_onnx` does). `batch` counts denoiser rows, `height`/`width` are
    latent pixels (unpacked for Flux), `text_len` denoiser text tokens; None takes the model's defaults
    (`ModelFamily.onnx_profile`: the demo's ranges). `component_dtypes` forces a precision per component, e.g.
    (("vae-decoder", "fp16"),) to override the VAE's fp32 policy. `external_data`: always write weights
    to a `.data` file (otherwise only above 2 GB). `polygraphy_max_weights`: the N:M cross-check runs
    polygraphy's own pure-Python per-tensor check up to this many candidate weights, a streamed numpy scan
    of the same rule above it (the sidecar's `nm_crosscheck.tool` says which). `output_quant`: quantized
    layers with an output scale get an output QuantizeLinear/DequantizeLinear pair (`--no-output-quant` drops
    them; TensorRT needs them to keep a GEMM INT8 in and out, the condition for its sparse INT8 tactics).
    """

    component: str = "transformer"
    dtype: str = AUTO
    opset: int | str = AUTO
    batch: tuple[int, int, int] | None = None
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
    output_quant: bool = True

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
        object.__setattr__(self, "opset", parse_opset(self.opset))
        if self.dtype != AUTO:
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
        if self.opset != AUTO and not lo <= self.opset <= hi:
            raise ConfigError(f"--opset {self.opset} is outside what the {self.exporter} exporter writes correctly "
                              f"({lo}..{hi}); use --opset 18 or 20, or leave it auto")

    def _check_dtype(self, dtype: str, flag: str) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"{flag}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if dtype != "bf16":
            return
        legacy_max = OPSETS["legacy"][1]
        if self.exporter == "legacy" and (self.opset == AUTO or self.opset < BF16_MIN_OPSET):
            raise ConfigError(f"{flag} bf16 needs opset {BF16_MIN_OPSET} and the legacy exporter stops at opset "
                              f"{legacy_max}: use --exporter dynamo")
        if self.opset != AUTO and self.opset < BF16_MIN_OPSET:
            raise ConfigError(f"{flag} bf16 cannot be exported at opset {self.opset}: ONNX Conv, Sin and Cos take "
                              f"bfloat16 only from opset {BF16_MIN_OPSET}; use --opset {BF16_MIN_OPSET} or leave "
                              "--opset out (auto)")

    @property
    def resolved(self) -> bool:
        """Whether dtype and opset are values (no `auto` left)."""
        return AUTO not in (self.dtype, self.opset)

    def resolve(self, model_dtype: tuple[str, str] | None = None, quant_opset: tuple[int, str] | None = None
                ) -> tuple[ExportConfig, dict]:
        """This config with `auto` dtype and opset replaced, and why each has its value:
        {"dtype": {"value", "requested", "why"}, "opset": {...}}.

        `model_dtype`: (dtype, why) of the model (`ModelFamily.onnx_dtype`), used when dtype is auto.
        `quant_opset`: (opset, why) its quantized layers' QDQ formats need (`qdq.required_opset`). An explicit
        opset too low for the precision the model picked, or for its quantized layers, is refused in one line.
        """
        if self.dtype == AUTO:
            if model_dtype is None:
                raise ValueError("resolve() needs the model's precision for dtype auto")
            dtype, dtype_why = model_dtype
        else:
            dtype, dtype_why = self.dtype, "given (--dtype)"
        if quant_opset is not None and dtype != "fp32":  # the scales are in the graph's float type
            quant_opset = max(quant_opset, (19, f"QuantizeLinear/DequantizeLinear take {dtype} scales from opset 19"))
        need = needed_opset({dtype, *(d for _, d in self.component_dtypes)})
        lo, hi = OPSETS[self.exporter]
        if self.opset == AUTO:
            if need > hi:
                raise ConfigError(f"this model exports in {dtype} by default ({dtype_why}), which needs opset {need}; "
                                  f"the {self.exporter} exporter stops at opset {hi}: use --exporter dynamo or "
                                  "--dtype fp16")
            opset = max(need, lo)
            opset_why = (f"the lowest opset that writes bf16 (ONNX Conv, Sin and Cos take bfloat16 from "
                         f"{BF16_MIN_OPSET})" if need == BF16_MIN_OPSET else
                         f"the lowest opset the dynamo exporter writes correctly; {dtype} needs no newer one")
            if quant_opset is not None and quant_opset[0] > opset:
                if quant_opset[0] > hi:
                    raise ConfigError(f"this quantized model needs opset {quant_opset[0]} ({quant_opset[1]}); the "
                                      f"{self.exporter} exporter stops at opset {hi}: use --exporter dynamo")
                opset, opset_why = quant_opset[0], f"the lowest opset for its quantized layers: {quant_opset[1]}"
        else:
            opset, opset_why = self.opset, "given (--opset)"
            if quant_opset is not None and opset < quant_opset[0]:
                raise ConfigError(f"--opset {opset} cannot write this quantized model: {quant_opset[1]}; leave "
                                  f"--opset out (auto picks {max(need, quant_opset[0])}) or pass --opset "
                                  f"{max(need, quant_opset[0])}")
            if opset < need:  # an explicit dtype was checked on construction: the model picked bf16
                raise ConfigError(f"--opset {opset} cannot write bf16, the precision this model exports in by "
                                  f"default ({dtype_why}); leave --opset out (auto picks {need}), pass "
                                  f"--opset {need} or --dtype fp16")
        choices = {"dtype": {"value": dtype, "requested": self.dtype, "why": dtype_why},
                   "opset": {"value": opset, "requested": self.opset, "why": opset_why}}
        return replace(self, dtype=dtype, opset=opset), choices

    def components(self) -> list[str]:
        return list(COMPONENTS) if self.component == "all" else [self.component]

    def dtype_for(self, component: str) -> tuple[str, bool]:
        """The precision requested for `component` and whether the user forced it per component."""
        forced = dict(self.component_dtypes)
        return (forced[component], True) if component in forced else (self.dtype, False)

    def to_dict(self) -> dict:
        return asdict(self)
