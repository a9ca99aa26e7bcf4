"""`python -m cprd_pipeline VERB ...` (also what `torchrun ... -m cprd_pipeline` runs)."""
from .cli import main

if __name__ == "__main__":
    main()
