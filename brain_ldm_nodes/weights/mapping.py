"""MONAI state-dict names ↔ our parameter names, as two readable tables.

Check them line by line against ``shared/UPSTREAM.md`` §5:

* :data:`OLD_TO_CURRENT_MONAI` — the MONAI-Generative names found in the released ``.pt``
  files → current MONAI names (44 U-Net keys, 6 autoencoder keys for the released config).
* :data:`CURRENT_MONAI_TO_OURS` — current MONAI names → the dotted paths of our Equinox
  modules (which mirror MONAI's module tree without its ``Convolution`` wrappers).

Layouts need no table: our modules store PyTorch's layouts (convolution ``(O, I, kD, kH, kW)``,
linear ``(out, in)``), so a converted tensor is the MONAI tensor, unchanged, cast to float32.
Shapes are still checked against the target module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

import equinox as eqx
import jax
import numpy as np

Module = TypeVar("Module", bound=eqx.Module)

#: (pattern, replacement) applied with ``re.sub`` in order; old MONAI-Generative → current MONAI.
OLD_TO_CURRENT_MONAI: tuple[tuple[str, str], ...] = (
    # U-Net: the attention output projection was an nn.Sequential (to_out.0) in MONAI-Generative.
    (r"(\.transformer_blocks\.\d+\.attn[12])\.to_out\.0\.(weight|bias)$", r"\1.out_proj.\2"),
    # Autoencoder: the decoder's upsampling convolution was renamed ``conv`` → ``postconv``.
    # In the decoder only Upsample blocks have a ``.conv.conv.`` path, so this is unambiguous.
    (r"^(decoder\.blocks\.\d+)\.conv\.conv\.(weight|bias)$", r"\1.postconv.conv.\2"),
)

#: (pattern, replacement) applied with ``re.sub`` in order; current MONAI → ours.
CURRENT_MONAI_TO_OURS: tuple[tuple[str, str], ...] = (
    # MONAI wraps every convolution in ``Convolution`` (an nn.Sequential whose child is ``conv``).
    (r"^(.*)\.conv\.(weight|bias)$", r"\1.\2"),
    # U-Net nn.Sequential positions → named fields.
    (r"^time_embed\.0\.", "time_embed.linear_1."),
    (r"^time_embed\.2\.", "time_embed.linear_2."),
    (r"^out\.0\.", "out_norm."),
    (r"^out\.2\.", "out_conv."),
)


class WeightMappingError(ValueError):
    """A state dict does not fit the target network (unknown, missing or wrong-shaped keys)."""


def _apply(rules: tuple[tuple[str, str], ...], name: str) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def monai_to_ours(name: str) -> str:
    """Our parameter path for a MONAI key, old (MONAI-Generative) or current."""
    return _apply(CURRENT_MONAI_TO_OURS, _apply(OLD_TO_CURRENT_MONAI, name))


def _path_name(path: tuple) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:  # pragma: no cover - our modules contain only attributes and tuples
            raise TypeError(f"unexpected pytree path entry {entry!r}")
    return ".".join(parts)


def _is_parameter(leaf: object) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def named_parameters(module: eqx.Module) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    """``{dotted path: array}`` for every array leaf of ``module`` (or shape of a skeleton's)."""
    params = eqx.filter(module, _is_parameter)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_name(path): leaf for path, leaf in leaves}


def check_parameters(
    module: eqx.Module, tensors: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> None:
    """Raise :class:`WeightMappingError` unless ``tensors`` (our names) fit ``module`` exactly."""
    expected = named_parameters(module)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    wrong_shape = sorted(
        f"{name}: got {tuple(tensors[name].shape)}, expected {tuple(expected[name].shape)}"
        for name in set(expected) & set(tensors)
        if tuple(tensors[name].shape) != tuple(expected[name].shape)
    )
    if unknown or missing or wrong_shape:
        problems = []
        for label, names in (("unknown", unknown), ("missing", missing), ("wrong shape", wrong_shape)):
            if names:
                shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
                problems.append(f"{len(names)} {label} key(s): {shown}")
        raise WeightMappingError(
            f"{source}: does not fit the {type(module).__name__} architecture of its config: "
            + "; ".join(problems)
        )


def rename_monai_state_dict(
    state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> dict[str, np.ndarray]:
    """``{our name: tensor}`` for a MONAI state dict with old or current key names."""
    renamed: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        ours = monai_to_ours(name)
        if ours in renamed:
            raise WeightMappingError(f"{source}: two keys map to {ours!r} (one is {name!r})")
        renamed[ours] = tensor
    return renamed


def load_parameters(
    module: Module, tensors: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> Module:
    """A copy of ``module`` whose array leaves are replaced by ``tensors`` (our names).

    ``module`` may be a shape-only skeleton from :func:`equinox.filter_eval_shape`. Every leaf
    must be given exactly once with its exact shape; values are cast to float32.

    Raises:
        WeightMappingError: listing unknown, missing and wrong-shaped names (``source`` names
            the file or bundle in the message).
    """
    expected = named_parameters(module)
    check_parameters(module, tensors, source=source)
    params, static = eqx.partition(module, _is_parameter)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    new_leaves = [jax.numpy.asarray(np.asarray(tensors[name], dtype=np.float32)) for name in expected]
    assert len(new_leaves) == len(leaves)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static)


def load_monai_state_dict(
    module: Module, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> Module:
    """``module`` with the weights of a MONAI state dict (old or current key names)."""
    return load_parameters(module, rename_monai_state_dict(state_dict, source=source), source=source)
