"""`python -m nerbatch` (and so `accelerate launch -m nerbatch ...`) runs the CLI."""

from nerbatch.cli import main

if __name__ == "__main__":
    main()
