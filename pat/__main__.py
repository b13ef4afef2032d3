"""``python -m pat`` (and ``torchrun -m pat``) runs the CLI."""

from pat.cli import main

if __name__ == "__main__":
    main()
