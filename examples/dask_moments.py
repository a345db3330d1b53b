"""Population statistics of an array larger than memory, with Dask and fastbn.

    pip install "fastbn[dask]"
    python examples/dask_moments.py                    # a 0.25 GB data set: seconds
    python examples/dask_moments.py --gigabytes 64     # larger than memory: the same code

The data set is a float32 .npy file of images (N, C, H, W) on disk, written here chunk by
chunk, then opened as a memory map and wrapped in a Dask array of chunks of 256 images.
Nothing reads the whole file into memory: fastbn.dask.moments computes each chunk's
per-channel moments with fastbn's kernels (float64 accumulation), one chunk per Dask
thread at a time, and merges them in a tree with Chan's formula, so memory use is a few
chunks whatever the size of the file, and the result is exact to float64 rounding however
the array is chunked. BatchNorm.recalibrate takes the Dask array directly.
"""

import argparse
import os
import tempfile
import time

import dask.array as da
import numpy as np

import fastbn
import fastbn.dask

CHANNELS, HEIGHT, WIDTH, CHUNK = 8, 32, 32, 256


def write_data_set(path, images, rng):
    """Channel c is about N(100 * c, (c + 1)**2), written a chunk at a time."""
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                     shape=(images, CHANNELS, HEIGHT, WIDTH))
    loc = (100.0 * np.arange(CHANNELS)).reshape(1, -1, 1, 1)
    scale = (1.0 + np.arange(CHANNELS)).reshape(1, -1, 1, 1)
    for begin in range(0, images, CHUNK):
        end = min(begin + CHUNK, images)
        shape = (end - begin, CHANNELS, HEIGHT, WIDTH)
        data[begin:end] = rng.standard_normal(shape, np.float32) * scale + loc
    data.flush()
    del data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=0.25, help="size of the data set")
    parser.add_argument("--directory", default=None, help="where to write it (a temporary "
                        "directory by default)")
    args = parser.parse_args()
    images = max(2, int(args.gigabytes * 2**30 / (CHANNELS * HEIGHT * WIDTH * 4)))

    with tempfile.TemporaryDirectory(dir=args.directory) as directory:
        path = os.path.join(directory, "images.npy")
        write_data_set(path, images, np.random.default_rng(0))
        array = da.from_array(np.load(path, mmap_mode="r"),
                              chunks=(CHUNK, CHANNELS, HEIGHT, WIDTH))
        print(f"data set: {array.shape} float32, {array.nbytes / 2**30:.2f} GiB on disk, "
              f"{array.npartitions} chunks of {CHUNK} images")

        start = time.perf_counter()
        moments = fastbn.dask.moments(array, axis=1)  # a fastbn.Moments, float64
        print(f"fastbn.dask.moments: {time.perf_counter() - start:.2f} s")
        for c in range(3):
            print(f"  channel {c}: count {moments.count[c]:.0f}, mean {moments.mean[c]:.6f}, "
                  f"std {np.sqrt(moments.var[c]):.6f}")

        bn = fastbn.BatchNorm(CHANNELS).recalibrate(array)  # exact population statistics
        print(f"BatchNorm.recalibrate: running_var[:3] = {bn.running_var[:3]}")
        del array  # close the memory map before the directory goes


if __name__ == "__main__":
    main()
