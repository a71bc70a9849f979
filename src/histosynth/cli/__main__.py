"""`python -m histosynth.cli ...` and `accelerate launch -m histosynth.cli ...`: the `histosynth` command."""

from histosynth.cli import main

if __name__ == "__main__":
    main()
