"""MONAI transforms of the pipeline, split by kind as MONAI's own ``monai/transforms`` is.

Array transforms take ``(C, *spatial)`` arrays or tensors; each has a dictionary counterpart
(suffix ``d``). Every name is importable from here (``pipeline.transforms.LoadSectiond``), which is
how the bundle configs name them.

- :mod:`.io`: ``LoadSectiond`` (a file, or one section of a stack: the one read path);
- :mod:`.intensity`: ``NormalizeSectionsd`` (zero mean, unit variance per section: ``section_stats``, ``apply_stats``),
  the non-finite rule (``check_finite``);
- :mod:`.labels`: ``BinarizeMask(d)``, ``LabelsToTargetd`` (binary, instances, classes: :mod:`pipeline.labels`),
  ``border_weight_map`` / ``BorderWeightMapd`` (paper eq. 2);
- :mod:`.post`: ``LogitsToOneHot(d)``, ``class_probabilities``, ``foreground_probability``, ``ForegroundProbabilityd``,
  ``encode_logits`` (``encode_prediction`` / ``encode_classes``) and ``check_output_settings`` (the one output step of every sink);
- :mod:`.spatial`: ``RandElasticGridd`` (the paper's elastic deformation), ``MirrorPadd`` (inference's mirroring).
"""

from pipeline.transforms.intensity import NormalizeSectionsd
from pipeline.transforms.io import LoadSectiond
from pipeline.transforms.labels import BinarizeMask, BinarizeMaskd, BorderWeightMapd, LabelsToTargetd, border_weight_map
from pipeline.transforms.post import (
    OUTPUTS,
    WRITABLE,
    ForegroundProbabilityd,
    LogitsToOneHot,
    LogitsToOneHotd,
    check_output_settings,
    class_probabilities,
    encode_classes,
    encode_logits,
    encode_prediction,
    foreground_probability,
)
from pipeline.transforms.spatial import MirrorPadd, RandElasticGridd

__all__ = [
    "OUTPUTS", "BinarizeMask", "BinarizeMaskd", "BorderWeightMapd", "ForegroundProbabilityd", "LabelsToTargetd", "LoadSectiond",
    "LogitsToOneHot", "LogitsToOneHotd", "MirrorPadd", "NormalizeSectionsd", "RandElasticGridd",
    "WRITABLE", "border_weight_map", "check_output_settings", "class_probabilities", "encode_classes", "encode_logits",
    "encode_prediction", "foreground_probability",
]
