"""Request and reply bodies of the HTTP API (pydantic models; they also document /docs)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator


class AnalyzeRequest(BaseModel):
    """POST /v1/analyze: a stored sample ``{run, slice, sample_id}`` or new ``{run, inputs}``."""

    model_config = ConfigDict(extra="forbid")

    run: StrictStr = Field(description="model run name")
    slice: Optional[StrictStr] = Field(None, description="data slice of a stored sample")
    sample_id: Optional[Union[StrictStr, StrictInt]] = Field(None, description="id of a stored sample")
    inputs: Optional[dict[StrictStr, StrictStr]] = Field(
        None, description="new sample: connection name -> base64 .npy float array (C, H, W)")
    labels: Optional[Union[list[StrictInt], Literal["all"]]] = Field(
        None, description='class indices, or "all"; default: the project\'s labels policy')
    algorithms: Optional[list[StrictStr]] = Field(None, description="gradcam, layercam, focus_layercam; default all")
    layers: Optional[list[StrictStr]] = Field(None, description="layer names; default every layer")
    connection: Optional[StrictStr] = Field(
        None, description="only layers that depend on this input; depth is counted from it")

    @model_validator(mode="after")
    def _one_source(self) -> "AnalyzeRequest":
        stored = self.slice is not None or self.sample_id is not None
        if self.inputs is not None and stored:
            raise ValueError("give either inputs or slice + sample_id, not both")
        if self.inputs is None and (self.slice is None or self.sample_id is None):
            raise ValueError("give slice and sample_id (a stored sample) or inputs (a new sample)")
        for field in ("labels", "algorithms", "layers"):
            if getattr(self, field) == []:
                raise ValueError(f"{field} is empty: leave it out for the default")
        return self


class MapOut(BaseModel):
    """One heatmap: uint8 row-major bytes (base64) and the raw value that 255 stands for."""

    algorithm: str
    layer: str
    depth: int
    depths: dict[str, int]
    label: int
    height: int
    width: int
    heatmap: str
    scale: float


class Analysis(BaseModel):
    """Per-sample error analysis (for a stored sample, whose ground truth is known)."""

    gt: int
    gt_name: str
    correct: bool
    loss: float
    confidence: float
    gt_probability: float
    top: list[tuple[int, float]]


class AnalyzeReply(BaseModel):
    """The reply of POST /v1/analyze."""

    run: str
    slice: Optional[str] = None
    sample_id: Optional[str] = None
    source: Literal["store", "engine"]
    prediction: int
    prediction_name: str
    probabilities: list[float]
    labels: list[int]
    maps: list[MapOut]
    analysis: Optional[Analysis] = None
