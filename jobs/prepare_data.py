"""Convert images to sd3ray's Parquet image set (train and test shards plus metadata.json).

    python jobs/prepare_data.py --data-root ../shared/data --out data/mnist_parquet          # MNIST (default)
    python jobs/prepare_data.py --source folder --images DIR --captions DIR/captions.csv \\
        --image-size 64 --channels 3 --out data/my_set                                     # your captioned images
    python jobs/prepare_data.py --source folder --images DIR --captions DIR/captions.csv \
        --image-size 64 --buckets --max-aspect 2 --out data/my_set                  # ... at their own aspect ratios
    python jobs/prepare_data.py --source cifar10 --data-root ~/data --out data/cifar10_parquet
    python jobs/prepare_data.py --source shapes --num-images 20000 --out data/shapes_parquet   # synthetic colour set
    python jobs/prepare_data.py --source shapes --out data/shapes_parquet \
        --text-encoder CLIP_L_DIR --text-encoder T5_DIR    # + each distinct prompt encoded once, on Ray Data actors
    python jobs/prepare_data.py --source shapes --image-size 64 --out data/shapes64_parquet \
        --vae stabilityai/sd-vae-ft-mse                     # + the latent cache: each picture encoded once

--out may be a URI such as s3://bucket/my_set: the set is built locally, then uploaded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy


from sd3ray.cli import job_parser, positive_int, run_job
from sd3ray.config import TextConfig, VaeConfig


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--source", choices=["mnist", "folder", "cifar10", "shapes"], default="mnist")
    parser.add_argument("--data-root", default="data",
                        help="mnist: folder holding MNIST/raw/*-ubyte (or to download to); cifar10: folder holding "
                             "cifar-10-batches-py/ or cifar-10-batches-bin/")
    parser.add_argument("--out", default="data/mnist_parquet",
                        help="output folder for Parquet shards, or a URI such as s3://bucket/mnist_parquet")
    parser.add_argument("--image-size", type=positive_int, default=32,
                        help="mnist: pad the 28×28 digits to this; folder/shapes: the side of the square images")
    parser.add_argument("--no-download", action="store_true", help="mnist: never try the network")
    folder = parser.add_argument_group("--source folder")
    folder.add_argument("--images", type=Path, help="the folder the captions file's paths are relative to")
    folder.add_argument("--captions", type=Path, help="CSV with columns file,caption, or JSON lines with both keys")
    folder.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 = greyscale, 3 = RGB")
    folder.add_argument("--test-fraction", type=float, default=0.05, help="held out by a hash of the file name")
    folder.add_argument("--buckets", action="store_true",
                        help="keep each image's aspect ratio: aspect-ratio buckets of about --image-size² pixels "
                             "instead of centre-cropped squares (docs/data.md)")
    folder.add_argument("--max-aspect", type=float, default=2.0, help="--buckets: the widest aspect kept (W/H or H/W)")
    folder.add_argument("--bucket-multiple", type=positive_int, default=8,
                        help="--buckets: both sides a multiple of this (the patch size, times the VAE's factor)")
    parser.add_argument("--num-images", type=positive_int, default=20000, help="shapes: training images")
    parser.add_argument("--shard-size", type=positive_int, default=20000, help="images per Parquet shard")
    text = parser.add_argument_group("frozen text encoders (text.encoder)")
    text.add_argument("--text-encoder", action="append", default=[], metavar="FOLDER_OR_HUB_ID",
                      help="write text_embeddings.parquet: every distinct prompt encoded once by these encoders, "
                           "in text.encoder's order (repeat the flag), on Ray Data actors")
    text.add_argument("--text-max-length", type=positive_int, default=TextConfig.max_length,
                      help="tokens per encoder (sets text.max_length; train with the same)")
    text.add_argument("--encoder-actors", type=positive_int, default=1, help="Ray Data encoder actors")
    text.add_argument("--encoder-gpus", type=float, default=0.0, help="GPUs per encoder actor (0 = CPU)")
    text.add_argument("--existing", action="store_true",
                      help="the set at --out is already prepared: only encode its prompts and/or pictures")
    vae = parser.add_argument_group("latent space (vae.source)")
    vae.add_argument("--vae", metavar="FOLDER_OR_HUB_ID",
                     help="cache the set's latents: every picture encoded once by this frozen AutoencoderKL, on Ray "
                          "Data actors (--encoder-actors, --encoder-gpus), into latents/ beside the shards")
    vae.add_argument("--vae-subfolder", default="", help="the VAE's subfolder (vae, in an SD3 pipeline folder)")
    vae.add_argument("--vae-dtype", choices=["float16", "float32"], default="float16",
                     help="what the cache stores (sets vae.cache_dtype; train with the same)")
    vae.add_argument("--vae-batch-size", type=positive_int, default=64,
                     help="pictures per VAE call on each actor: lower it if the VAE runs out of memory")
    args = parser.parse_args()
    if args.existing:
        if not (args.text_encoder or args.vae):
            parser.error("--existing only encodes: name the encoders with --text-encoder, or the VAE with --vae")
        return encode_existing(args)

    from sd3ray.data import image_sets
    from sd3ray.data.mnist import prepare_mnist

    match args.source:
        case "mnist":
            out = prepare_mnist(args.data_root, args.out, args.image_size, download=not args.no_download)
        case "folder":
            if args.images is None or args.captions is None:
                parser.error("--source folder needs --images DIR and --captions FILE")
            if not 0 < args.test_fraction < 1:
                parser.error(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
            if args.buckets:
                from sd3ray.data.bucketed_sets import import_bucketed_folder

                out = import_bucketed_folder(args.images, args.captions, args.out, args.image_size, args.channels,
                                             args.bucket_multiple, args.max_aspect, args.test_fraction,
                                             args.shard_size)
            else:
                out = image_sets.import_captioned_folder(args.images, args.captions, args.out, args.image_size,
                                                         args.channels, args.test_fraction, args.shard_size)
        case "cifar10":
            out = image_sets.import_cifar10(Path(args.data_root), args.out, args.shard_size)
        case "shapes":
            out = image_sets.write_coloured_shapes(args.out, args.num_images, args.image_size,
                                                   shard_size=args.shard_size)
    print(f"wrote {image_sets.describe(out)}")
    return encode_existing(args) if args.text_encoder or args.vae else 0


def encode_existing(args) -> int:
    """The prompts' embeddings and/or the pictures' latents of the set at --out, each computed once on Ray Data."""
    from sd3ray.cluster.connect import connect
    from sd3ray.cluster.ray_data import precompute_latents, precompute_text_embeddings
    connect()
    if args.text_encoder:
        text = TextConfig(encoder=tuple(args.text_encoder), max_length=args.text_max_length)
        started = time.monotonic()
        path, count = precompute_text_embeddings(str(args.out), text, args.encoder_actors, args.encoder_gpus)
        print(f"sd3ray: encoded {count} distinct prompts in {time.monotonic() - started:.1f} s into {path}")
    if args.vae:
        vae = VaeConfig(source=args.vae, subfolder=args.vae_subfolder, cache_dtype=args.vae_dtype)
        started, done = time.monotonic(), [0]

        def progress(name: str, images: int) -> None:
            done[0] += images
            rate = done[0] / max(time.monotonic() - started, 1e-9)
            print(f"sd3ray: latents of {name}: {images:,} pictures ({rate:,.1f} pictures/s)", flush=True)

        location, shards = precompute_latents(str(args.out), vae, args.encoder_actors, args.encoder_gpus,
                                              args.vae_batch_size, on_shard=progress)
        kept = "" if shards else " (every shard was cached already)"
        print(f"sd3ray: latent cache {location}: {shards} shards encoded in {time.monotonic() - started:.1f} s{kept}; "
              f"train with --set vae.source={args.vae}" + (f" vae.subfolder={args.vae_subfolder}"
                                                          if args.vae_subfolder else ""))
    return 0


if __name__ == "__main__":
    run_job(main)
