"""Real T1w images onto the model grid: rigid (6-dof) registration to an MNI152 template.

The upstream model was trained on T1w images rigidly registered to MNI space and cropped to
160 x 224 x 160 at 1 mm (``/work/shared/UPSTREAM.md`` section 2). :func:`register_t1w` does
the same for any T1w: it registers the image rigidly to the MNI152 template that nilearn ships
(no download), resamples it onto the model grid and scales its intensities to [0, 1].

Spaces and the one transform (all world coordinates are NIfTI RAS+ millimetres):

* **Template (MNI) world**: ICBM 2009a nonlinear symmetric MNI152, 1 mm, skull-stripped
  (nilearn's ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, TemplateFlow name
  ``MNI152NLin2009aSym``).
* **Model-grid world**: the coordinates of the returned image's affine,
  :func:`brain_ldm_nodes.imaging.model_affine` (grid centre at (0, 0, 0)). The model grid
  sits in MNI space with its centre at MNI :data:`GRID_CENTRE_MNI_MM` = (0, -17, 5) mm, the
  centre of the template brain's bounding box (x -72..72, y -107..73, z -72..82 mm), so that
  the 160 x 224 x 160 mm box covers the brain with a margin on every side (about 8, 22 and
  3 mm at each end of x, y and z); centring on the MNI origin instead would cut the vertex
  (z > 79.5) and leave only 4.5 mm behind the occipital pole. Model-grid world = MNI world
  minus this centre: a pure translation (:attr:`Registration.grid_to_template`).
* **Source world**: the input image's own world (its affine; scanner coordinates).

:attr:`Registration.transform` maps **template (MNI) world points to source world points**
(ITK's convention for a registration with the template as the fixed image: the transform that
resamples the source into template space). :func:`write_itk_transform` writes it, converted to
ITK's LPS coordinates, as an ITK ``AffineTransform_double_3_3`` text file: the file BIDS names
``..._from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt``, read with the same meaning by
SimpleITK (tested) and, by the same ITK convention, ``antsApplyTransforms``.

Registration uses SimpleITK (ITK's v4 registration framework): Mattes mutual information
restricted to a dilated template brain mask (so skull, neck and face in the source do not
pull), a centred Euler (rigid) transform, regular-step gradient descent and three levels
(shrink 4/2/1 with Gaussian smoothing 2/1/0 mm). The start is taken from the head itself, not
from its centre of mass (which a neck or shoulders move): the top of the head and the centroid
of its upper 100 mm, tried with a few vertex-to-brain offsets, the best by the coarse metric.
The source header must describe the head roughly upright (within ~20 degrees), which scanner
headers do; the rest is found by the optimiser.

Quality: the normalised cross-correlation (NCC) between the registered image and the template
over the template's brain mask. A registration whose NCC stays below ``min_ncc`` (default
:data:`DEFAULT_MIN_NCC`) raises :class:`RegistrationError` instead of returning a misaligned
image.

Where things are: :mod:`.template` (the MNI152 template, the grid's place in it, the NCC),
:mod:`.resample` (:class:`Registration`, resampling onto the model grid with a known transform
and back onto the source), :mod:`.rigid` (:func:`register_t1w`, SimpleITK), :mod:`.transforms`
(ITK's LPS convention, ITK transform files).
"""

from __future__ import annotations

from .resample import (
    DEFAULT_MIN_NCC,
    Registration,
    RegistrationError,
    resample_to_model_grid,
    resample_to_source,
)
from .rigid import DEFAULT_LEVELS, register_t1w
from .template import GRID_CENTRE_MNI_MM, TEMPLATE_NAME, load_template
from .transforms import read_itk_transform, write_itk_transform

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_MIN_NCC",
    "GRID_CENTRE_MNI_MM",
    "TEMPLATE_NAME",
    "Registration",
    "RegistrationError",
    "load_template",
    "read_itk_transform",
    "register_t1w",
    "resample_to_model_grid",
    "resample_to_source",
    "write_itk_transform",
]
