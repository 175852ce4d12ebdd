"""``brain-ldm-convert``: the MONAI bundle's ``.pt`` files → ``brain_ldm.vae`` + ``brain_ldm.1``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .._version import __version__

DESCRIPTION = """\
Convert the released Brain LDM weights (MONAI model-zoo bundle
brain_image_synthesis_latent_diffusion_model, files models/autoencoder.pt and models/model.pt)
into two safetensors bundles, without PyTorch:

  OUTPUT_DIR/brain_ldm.vae   the autoencoder (base bundle)
  OUTPUT_DIR/brain_ldm.1     the diffusion U-Net + DDIM scheduler; refers to its base

Load them with  BrainLDM.from_pretrained("OUTPUT_DIR/brain_ldm.1").
Pickles are read with an allow-list: a checkpoint that would run code is refused.
"""

EPILOG = """\
example:
  brain-ldm-convert --autoencoder models/autoencoder.pt --unet models/model.pt -o converted/

publish (huggingface_hub's own CLI; upload the base first, then point the model at it):
  brain-ldm-convert --autoencoder models/autoencoder.pt --unet models/model.pt -o converted/ \\
      --base-repo-id you/brain-ldm-vae
  hf upload you/brain-ldm-vae converted/brain_ldm.vae .
  hf upload you/brain-ldm converted/brain_ldm.1 .
"""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brain-ldm-convert", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--autoencoder", required=True, type=Path, metavar="AUTOENCODER_PT",
                        help="the upstream autoencoder checkpoint: models/autoencoder.pt (55 MB)")
    parser.add_argument("--unet", required=True, type=Path, metavar="MODEL_PT",
                        help="the upstream diffusion U-Net checkpoint: models/model.pt (2.2 GB)")
    parser.add_argument("-o", "--output-dir", required=True, type=Path,
                        help="folder to write brain_ldm.vae/ and brain_ldm.1/ into (created)")
    parser.add_argument("--base-repo-id", metavar="REPO_ID",
                        help="Hub repo the VAE bundle will be published to; recorded in brain_ldm.1 "
                             "as its base (the relative path ../brain_ldm.vae is always recorded too)")
    parser.add_argument("--base-revision", metavar="REVISION",
                        help="revision (tag/commit) of --base-repo-id to pin")
    parser.add_argument("--autoencoder-config", type=Path, metavar="JSON",
                        help="AutoencoderKLConfig as JSON, for checkpoints of another architecture "
                             "(default: the released one)")
    parser.add_argument("--unet-config", type=Path, metavar="JSON",
                        help="DiffusionModelUNetConfig as JSON (default: the released architecture)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _load_config(path: Path | None, cls: type, flag: str):
    if path is None:
        return None
    try:
        return cls(**json.loads(path.read_text(encoding="utf-8")))
    except OSError as error:
        raise ValueError(f"{flag} {path}: {error.strerror}") from None
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"{flag} {path}: not a valid {cls.__name__} ({error})") from None


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    package_logger = logging.getLogger("brain_ldm_nodes")  # ours only, not JAX's backend chatter
    if not any(getattr(h, "name", None) == "brain-ldm-convert" for h in package_logger.handlers):
        handler = logging.StreamHandler()
        handler.set_name("brain-ldm-convert")
        handler.setFormatter(logging.Formatter("brain-ldm-convert: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    from ..models import AutoencoderKLConfig, DiffusionModelUNetConfig
    from ..weights.bundle import BundleError
    from ..weights.convert import ConversionError, convert_upstream

    try:
        result = convert_upstream(
            args.autoencoder, args.unet, args.output_dir,
            autoencoder_config=_load_config(args.autoencoder_config, AutoencoderKLConfig,
                                            "--autoencoder-config"),
            unet_config=_load_config(args.unet_config, DiffusionModelUNetConfig, "--unet-config"),
            base_repo_id=args.base_repo_id, base_revision=args.base_revision,
        )
    except (ConversionError, BundleError, ValueError, OSError) as error:
        if args.verbose:
            raise
        message = str(error) if not isinstance(error, OSError) else f"{error.filename}: {error.strerror}"
        print(f"brain-ldm-convert: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {result.vae}")
    print(f"wrote {result.model}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
