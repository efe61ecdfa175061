"""`python -m nerbatch` (and so `accelerate launch -m nerbatch ...`) runs the CLI."""

from nerbatch.cli import run

if __name__ == "__main__":
    run()
