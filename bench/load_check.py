"""Load check: inspect 500 real images in one batch through the engine and through the app; memory and time.

    python bench/load_check.py                      # trains a small throw-away model (quick preset, 1 epoch)
    python bench/load_check.py --model demo-solar-cells --models-dir models
    python bench/load_check.py --part engine        # or --part app

Engine: ``Detector.inspect`` streams over the images (loaded lazily, results reduced to scores, as the CLI does);
RSS (``/proc/self/status`` VmRSS) is printed after every 50 images. App: the Inspect page (Streamlit AppTest) is
given all images as one upload; RSS is sampled every 0.2 s while it runs, and the per-image results the page keeps
in session state are measured. Each part runs in its own process so its figures are its own. Asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets"
SOURCES = [DATA / "magnetic_tile" / "test", DATA / "mvtec_bottle" / "test"]
MB = 1024 * 1024


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS), without psutil."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def image_paths(n: int) -> list[Path]:
    """The first ``n`` of magnetic_tile/test then mvtec_bottle/test (sorted; cycled if there are fewer).

    magnetic_tile/test alone holds 582 images, so the default 500 are all magnetic-tile photos; every image is
    resized to the model's input size either way, so the memory figures do not depend on which ones.
    """
    from fod_app.data import list_images

    paths = [p for root in SOURCES if root.is_dir() for p in list_images(root, recursive=True)]
    if not paths:
        sys.exit(f"no images under {', '.join(map(str, SOURCES))}")
    return list(itertools.islice(itertools.cycle(paths), n))


def ensure_model(args: argparse.Namespace) -> tuple[str, Path]:
    """The model to use: ``--model`` in ``--models-dir``, or a small one trained now into a temporary folder."""
    if args.model:
        return args.model, Path(args.models_dir or os.environ.get("FOD_MODELS_DIR") or REPO / "models").resolve()
    from fod_app.bundle import save_bundle
    from fod_app.config import create_config
    from fod_app.data import list_images, load_images
    from fod_app.training import train

    root = Path(tempfile.mkdtemp(prefix="fod-load-check-"))
    config = create_config("quick", epochs=1)
    started = time.perf_counter()
    report = load_images(list_images(REPO / "sample_data" / "train_good"), config.image_size)
    detector = train([img for _, img in report.images], config, device=args.device)
    save_bundle(detector, "load-check", root=root)
    print(f"trained 'load-check' (quick preset, 1 epoch) in {time.perf_counter() - started:.0f} s -> {root}")
    return "load-check", root


def engine_part(args: argparse.Namespace) -> None:
    import torch

    from fod_app.bundle import load_bundle
    from fod_app.data import ImageLoadError, load_image, prepare_image

    detector = load_bundle(args.model, root=Path(args.models_dir), device=args.device)
    size = detector.config.image_size
    paths = image_paths(args.n)
    baseline = rss_mb()

    def stream():
        for path in paths:
            try:
                yield str(path), prepare_image(load_image(path), size)
            except ImageLoadError as err:
                print(f"unreadable: {err}")

    rows, scores, peak = [], [], baseline
    started = time.perf_counter()
    for done, result in enumerate(detector.inspect(stream(), batch_size=8), start=1):
        scores.append(result.score)
        peak = max(peak, rss_mb())
        if done % 50 == 0:
            rows.append((done, time.perf_counter() - started, rss_mb()))
    total = time.perf_counter() - started
    print(f"\n## Engine: Detector.inspect over {len(scores)} images (batch 8, {args.device}, "
          f"{torch.get_num_threads()} threads)\n")
    print(f"RSS after loading the model, before the first image: {baseline:.0f} MiB\n")
    print("| images | elapsed s | RSS MiB | growth since 50 images MiB |")
    print("|---|---|---|---|")
    for done, elapsed, rss in rows:
        print(f"| {done} | {elapsed:.1f} | {rss:.0f} | {rss - rows[0][2]:+.0f} |")
    print(f"\ntotal {total:.1f} s ({1000 * total / max(1, len(scores)):.0f} ms/image); peak RSS {peak:.0f} MiB; "
          f"growth 50 -> {rows[-1][0]} images: {rows[-1][2] - rows[0][2]:+.0f} MiB")


def app_part(args: argparse.Namespace) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["FOD_MODELS_DIR"] = args.models_dir
    os.environ["FOD_DEVICE"] = args.device
    paths = image_paths(args.n)
    names = [f"{p.parent.name}_{p.name}" for p in paths]
    uploads = [(name, p.read_bytes(), "image/png") for name, p in zip(names, paths, strict=True)]
    upload_mb = sum(len(u[1]) for u in uploads) / MB

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=3600)
    at.run()
    at.switch_page("pages/3_inspect.py").run()
    at.selectbox(key="inspect_model_choice").set_value(args.model).run()
    before = rss_mb()

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_mb()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    at.file_uploader(key="inspect_uploads").set_value(uploads).run()
    total = time.perf_counter() - started
    after_first = rss_mb()
    at.run()  # a rerun (e.g. moving a slider) reuses the stored results
    stop.set()
    sampler.join()
    after_rerun = rss_mb()
    errors = [str(e.value) for e in at.exception]
    inspection = at.session_state["inspection"]
    results = inspection["results"]
    arrays = sum(r["image"].nbytes + r["map"].nbytes for r in results)
    uris = sum(len(r["thumb"]) + len(r["thumb_overlay"]) for r in results)
    first = results[0]
    print(f"\n## App: Inspect page (AppTest), one upload of {len(uploads)} images ({upload_mb:.0f} MiB of PNG)\n")
    if errors:
        print("EXCEPTIONS:", errors)
    print(f"inspected {len(results)} images, {len(inspection['failures'])} unreadable, in {total:.1f} s "
          f"({1000 * total / max(1, len(results)):.0f} ms/image)\n")
    print("| moment | RSS MiB |")
    print("|---|---|")
    print(f"| page shown, model loaded, nothing uploaded | {before:.0f} |")
    for fraction in (0.25, 0.5, 0.75):
        t, rss = samples[min(len(samples) - 1, int(fraction * len(samples)))]
        print(f"| {int(100 * fraction)}% of the run ({t - started:.0f} s) | {rss:.0f} |")
    print(f"| peak while inspecting | {max(r for _, r in samples):.0f} |")
    print(f"| results shown | {after_first:.0f} |")
    print(f"| after a rerun | {after_rerun:.0f} |")
    print(f"\nsession-state results: {arrays / MB:.1f} MiB of arrays (photo uint8 {first['image'].shape} "
          f"+ map {first['map'].dtype} {first['map'].shape} per image) + {uris / MB:.1f} MiB of thumbnails; "
          f"{(arrays + uris) / len(results) / 1024:.0f} KiB per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--model", help="bundle name (default: train a small throw-away model)")
    parser.add_argument("--models-dir", help="folder holding --model (default: $FOD_MODELS_DIR or models/)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=["both", "engine", "app"], default="both")
    args = parser.parse_args()
    if args.part == "engine":
        return engine_part(args)
    if args.part == "app":
        return app_part(args)
    model, root = ensure_model(args)
    for part in ("engine", "app"):
        command = [sys.executable, __file__, "--part", part, "--n", str(args.n), "--model", model,
                   "--models-dir", str(root), "--device", args.device]
        subprocess.run(command, check=True, cwd=REPO)


if __name__ == "__main__":
    main()
