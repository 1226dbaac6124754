"""`python -m sar_hf`: the `sar-hf` command, for launchers that start a module (`accelerate launch -m sar_hf`)."""

from sar_hf.cli import main

if __name__ == "__main__":
    main()
