"""Generate BraTS-format cases into raw_data_dir: the project's embedded default data (bratsunet/generator.py).

    python synthetic.py                          # synthetic_cases cases of synthetic_shape, synthetic_style
    python synthetic.py --hp hyperparameters_synthetic.txt
    python synthetic.py --hp hyperparameters_anatomy.txt     # on real brains' label maps (anatomy_dir)
"""
from bratsunet import anatomy, settings_text
from bratsunet.generator import generate_dataset


# What main() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("raw_data_dir", "seed", "data_format", "generated data")


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        maps = anatomy.label_maps(hp.anatomy_dir) if hp.synthetic_style == "anatomy" else None
        names = generate_dataset(hp.raw_data_dir, hp.synthetic_cases, hp.synthetic_shape, hp.seed,
                                 hp.synthetic_compress, True, hp.data_format, hp.synthetic_style, maps)
        print(f"{len(names)} {hp.synthetic_style} cases of shape {tuple(hp.synthetic_shape)} in {hp.raw_data_dir}")
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
