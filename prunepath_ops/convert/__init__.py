"""Dense model -> PrunePath (issue 5): balanced k-means grouping, conversion, router losses, tau
schedule, sparsity calibration, checkpoints and a training-free router.

Import it explicitly (``import prunepath_ops.convert``); ``safetensors`` and ``tqdm`` are only
imported by the functions that need them.
"""

from prunepath_ops.convert.baseline import expert_activation_mass, expert_activations, fit_router_lstsq
from prunepath_ops.convert.calibrate import (
    Calibration,
    CalibrationError,
    calibrate_tau,
    calibrate_tau_per_layer,
    ffn_sparsity,
    make_measure_fn,
    record_num_active,
)
from prunepath_ops.convert.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    apply_checkpoint,
    backbone_parameters,
    load_checkpoint,
    save_checkpoint,
)
from prunepath_ops.convert.convert import (
    ConversionError,
    check_identity,
    convert_mlp,
    convert_model,
    default_find,
    guess_activation,
)
from prunepath_ops.convert.kmeans import KMeansResult, balanced_assign, balanced_kmeans
from prunepath_ops.convert.losses import RouterLosses, TauSchedule, router_loss, router_losses

__all__ = [
    "Calibration",
    "CalibrationError",
    "CheckpointError",
    "ConversionError",
    "KMeansResult",
    "LoadedCheckpoint",
    "RouterLosses",
    "TauSchedule",
    "apply_checkpoint",
    "backbone_parameters",
    "balanced_assign",
    "balanced_kmeans",
    "calibrate_tau",
    "calibrate_tau_per_layer",
    "check_identity",
    "convert_mlp",
    "convert_model",
    "default_find",
    "expert_activation_mass",
    "expert_activations",
    "ffn_sparsity",
    "fit_router_lstsq",
    "guess_activation",
    "load_checkpoint",
    "make_measure_fn",
    "record_num_active",
    "router_loss",
    "router_losses",
    "save_checkpoint",
]
