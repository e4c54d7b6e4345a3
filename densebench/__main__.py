"""``python -m densebench`` is the ``densebench`` command (so ``torchrun -m densebench run ...`` works)."""

from .cli import main

if __name__ == "__main__":
    main()
