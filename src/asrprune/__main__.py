"""``python -m asrprune`` entry point."""

from asrprune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
