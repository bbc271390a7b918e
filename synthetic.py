"""Generate BraTS-format cases into raw_data_dir: the project's embedded default data (bratsunet/generator.py).

    python synthetic.py                          # synthetic_cases cases of synthetic_shape, synthetic_style
    python synthetic.py --hp hyperparameters_synthetic.txt
"""
from bratsunet import hyperparameters
from bratsunet.generator import generate_dataset


def main():
    hp = hyperparameters.from_command_line()
    try:
        names = generate_dataset(hp.raw_data_dir, hp.synthetic_cases, hp.synthetic_shape, hp.seed,
                                 hp.synthetic_compress, True, hp.data_format, hp.synthetic_style)
        print(f"{len(names)} {hp.synthetic_style} cases of shape {tuple(hp.synthetic_shape)} in {hp.raw_data_dir}")
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
