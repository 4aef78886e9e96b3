"""python -m mskjax.data.synthetic: write a synthetic dataset (see dataset.main)."""
import sys

from mskjax.data.synthetic.dataset import main

if __name__ == "__main__":
    sys.exit(main())
