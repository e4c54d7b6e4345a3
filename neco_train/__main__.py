"""``python -m neco_train`` (also what ``torchrun ... -m neco_train`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
