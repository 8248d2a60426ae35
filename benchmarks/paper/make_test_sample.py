"""Write ``lirpa_patch/_data/mnist_test_sample.npz``: the first 2,000 official MNIST test digits.

    .venv/bin/python benchmarks/paper/make_test_sample.py ../shared/data/mnist

Lossless (uint8 grey levels, labels as int64), in the order of ``t10k-images-idx3-ubyte``,
so ``load_dataset("sample:test")`` image ``i`` is MNIST test image ``i``. Refuses to
overwrite a file whose digits differ.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lirpa_patch.data import load_dataset  # noqa: E402

COUNT = 2000


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else str(ROOT.parent / "shared" / "data" / "mnist")
    test = load_dataset(f"{source}:test", num=COUNT)
    x = np.rint(test.images[:, 0].numpy() * 255).astype(np.uint8)
    y = test.labels.numpy().astype(np.int64)
    target = ROOT / "lirpa_patch" / "_data" / "mnist_test_sample.npz"
    if target.exists():
        with np.load(target) as kept:
            if np.array_equal(kept["x"], x) and np.array_equal(kept["y"], y):
                print(f"{target} already holds these {COUNT} digits")
                return
        sys.exit(f"{target} exists and holds other digits; move it away first")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    target.write_bytes(buffer.getvalue())
    print(f"wrote {target}: {COUNT} test digits, {len(buffer.getvalue())} bytes, labels {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()
