"""``python -m attnprobe``: the same command line as the ``attnprobe`` script."""

from attnprobe.cli import main

if __name__ == "__main__":
    main()
