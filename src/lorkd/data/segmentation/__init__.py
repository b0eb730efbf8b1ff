"""Segmentation data, one module per step of the pipeline (each imports only the ones above it):

- :mod:`.cases`: :class:`CaseRef` (where a case lives) and :class:`Case` (its loaded arrays);
- :mod:`.orientation`: :data:`CANONICAL_ORIENTATION` and :func:`reorient` (3D NIfTI axes);
- :mod:`.formats`: reading one case (HDF5, NIfTI, 2D image/mask) and header-only probes;
- :mod:`.inputs`: one image to segment without a label (what ``lorkd predict`` reads), by the same readers;
- :mod:`.folders`: finding the cases of a data set in its folder (the readers);
- :mod:`.split`: patient-wise splits and split files;
- :mod:`.tasks`: :class:`SegmentationTaskData` and :func:`load_segmentation_task`;
- :mod:`.preprocess`: normalisation and resampling (:class:`Preprocess`);
- :mod:`.cache`: :class:`VolumeCache` of preprocessed volumes;
- :mod:`.datasets`: :class:`PatchDataset` (training patches) and :class:`VolumeDataset` (whole volumes).

One code path serves 2D and 3D: arrays are ``[C, *spatial]`` images and ``[*spatial]`` labels
whatever ``spatial_dims`` is.

Typical use::

    acdc = load_segmentation_task("acdc", "acdc_sslmis_h5", format="hdf5", num_classes=4, seed=0)
    la = load_segmentation_task("la", "la2018_h5", format="hdf5", num_classes=2, seed=0)
    acdc.save_split(out / "split_acdc.json")
    pre = Preprocess(normalize="zscore", scale=0.5)
    cache = VolumeCache()
    train = PatchDataset([acdc, la], patch_size=(16, 64, 64), preprocess=pre, cache=cache)
    test = VolumeDataset([acdc, la], split="test", preprocess=pre, cache=cache)
    DataLoader(test, batch_size=None)   # whole volumes, one at a time (meta holds None affines)
"""

from .cache import PreparedVolume, VolumeCache
from .cases import Case, CaseRef
from .datasets import PatchDataset, VolumeDataset, fit_channels
from .folders import (
    RARE_LABEL_SHARE,
    RARE_MASK_SHARE,
    PatientRule,
    default_patient_rule,
    read_hdf5_folder,
    read_image_mask_folder,
    read_msd_folder,
    scan_label_values,
    warn_rare_label_values,
)
from .formats import image_to_array, load_case, load_label, pil_open, probe_case, probe_spacing
from .inputs import IMAGE_SUFFIXES, INPUT_SUFFIXES, InputImage, input_suffix, read_input_image, series_folders
from .orientation import CANONICAL_ORIENTATION, reorient
from .preprocess import (
    NORMALIZE_DETAILS, NORMALIZE_MODES, NORMALIZE_TRANSFORMS, Preprocess, normalize_intensity, preprocess_case, resample,
    resize_case,
)
from .split import DEFAULT_SPLIT_NAMES, apply_split, load_split, save_split, split_cases
from .tasks import SegmentationTaskData, load_segmentation_task, reader_options

__all__ = [
    # cases
    "Case",
    "CaseRef",
    # orientation
    "CANONICAL_ORIENTATION",
    "reorient",
    # formats
    "image_to_array",
    "load_case",
    "load_label",
    "probe_case",
    "pil_open",
    "probe_spacing",
    # inputs (an image to segment, no label)
    "IMAGE_SUFFIXES",
    "INPUT_SUFFIXES",
    "InputImage",
    "input_suffix",
    "read_input_image",
    "series_folders",
    # folders
    "PatientRule",
    "RARE_LABEL_SHARE",
    "RARE_MASK_SHARE",
    "default_patient_rule",
    "read_hdf5_folder",
    "read_msd_folder",
    "read_image_mask_folder",
    "scan_label_values",
    "warn_rare_label_values",
    # split
    "DEFAULT_SPLIT_NAMES",
    "split_cases",
    "save_split",
    "load_split",
    "apply_split",
    # tasks
    "SegmentationTaskData",
    "load_segmentation_task",
    "reader_options",
    # preprocess
    "NORMALIZE_DETAILS",
    "NORMALIZE_MODES",
    "NORMALIZE_TRANSFORMS",
    "Preprocess",
    "normalize_intensity",
    "resample",
    "resize_case",
    "preprocess_case",
    # cache
    "PreparedVolume",
    "VolumeCache",
    # datasets
    "PatchDataset",
    "VolumeDataset",
    "fit_channels",
]
