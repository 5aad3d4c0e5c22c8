"""Dense CRF settings, apart from :mod:`rib_core.crf` so that configs holding them (DeepLab's, the
refinement's) can be read without numpy, pydensecrf or torch: the API validates them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CrfConfig(BaseModel):
    """Dense CRF parameters; defaults are IRN's ``crf_inference_label`` (misc/imutils.py)."""

    model_config = ConfigDict(extra="forbid")

    unary: Literal["labels", "probabilities"] = "labels"  # RIB/IRN use unary_from_labels
    iterations: int = Field(10, ge=1, le=100)              # crf_inference_label t=10
    gt_prob: float = Field(0.7, gt=0, lt=1)                # crf_inference_label gt_prob=0.7 ("labels" only)
    gaussian_sxy: float = Field(3.0, gt=0)                 # addPairwiseGaussian(sxy=3, compat=3)
    gaussian_compat: float = Field(3.0, ge=0)
    bilateral_sxy: float = Field(50.0, gt=0)               # addPairwiseBilateral(sxy=50, srgb=5, compat=10)
    bilateral_srgb: float = Field(5.0, gt=0)
    bilateral_compat: float = Field(10.0, ge=0)


# PSA's crf_inference (jiwoon-ahn/psa tool/imutils.py): softmax unary, bilateral sxy 80 / srgb 13.
PSA_PROBABILITY_CRF = CrfConfig(unary="probabilities", bilateral_sxy=80.0, bilateral_srgb=13.0)
